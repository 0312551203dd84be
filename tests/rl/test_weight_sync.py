"""Weight sync in buckets (actors/weight_sync.py): packing, flat buckets through the object store,
the gloo protocol, the RL loop syncing a tied model's weights through the object store in several
buckets, and with 2 ZeRO-3 policy ranks and 2 vLLM engines over gloo (the GPU path's protocol,
with the NCCL backend swapped for gloo)."""

import threading

import pytest
import ray
import torch

from actors.group import free_port
from actors.weight_sync import (
    WeightBroadcast,
    fetch_buckets,
    pack_bucket,
    plan_buckets,
    put_buckets,
    unpack_bucket,
)
from rlhf.models.factory import ensure_tiny_model
from rlhf.rl.trainer import RLRun
from tests.rl.conftest import TINY
from tests.rl.test_rl_loop import rl_config


def _llama_like_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(10, 8, generator=g)}
    for layer in range(2):
        p = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"{p}.self_attn.{name}.weight"] = torch.randn(8, 8, generator=g)
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[f"{p}.mlp.{name}.weight"] = torch.randn(8, 8, generator=g)
        state[f"{p}.input_layernorm.weight"] = torch.randn(8, generator=g).bfloat16()
    state["lm_head.step"] = torch.tensor([3], dtype=torch.int64)  # odd sizes and dtypes
    state["model.norm.weight"] = torch.randn(5, generator=g).half()
    return state


def _group_of(name: str) -> str | None:
    for part in ("q_proj", "k_proj", "v_proj"):
        if f".{part}." in name:
            return name.replace(part, "qkv")
    for part in ("gate_proj", "up_proj"):
        if f".{part}." in name:
            return name.replace(part, "gate_up")
    return None


def test_buckets_keep_fused_groups_whole_and_round_trip_bit_exactly():
    state = _llama_like_state()
    # 8x8 float32 = 256 bytes: a q/k/v group (768 bytes) is larger than the 600-byte bucket.
    plan = plan_buckets([(k, tuple(v.shape), v.dtype) for k, v in state.items()], 600)
    names = [e["name"] for bucket in plan for e in bucket]
    assert sorted(names) == sorted(state) and len(names) == len(state)  # each tensor once
    assert len(plan) > 3
    home = {e["name"]: i for i, bucket in enumerate(plan) for e in bucket}
    groups: dict[str, set[int]] = {}
    for name in state:
        if _group_of(name):
            groups.setdefault(_group_of(name), set()).add(home[name])
    assert len(groups) == 4 and all(len(b) == 1 for b in groups.values()), groups
    for bucket in plan:  # a bucket over the limit holds exactly one fused group
        size = bucket[-1]["offset"] + bucket[-1]["nbytes"]
        assert size <= 600 or len({_group_of(e["name"]) for e in bucket}) == 1
        assert all(e["offset"] % 16 == 0 for e in bucket)
    for bucket in plan:
        buf = pack_bucket(bucket, state)
        assert buf.dtype == torch.uint8 and buf.dim() == 1
        for name, tensor in unpack_bucket(bucket, buf):
            ref = state[name]
            assert tensor.dtype == ref.dtype and tensor.shape == ref.shape
            assert torch.equal(tensor.view(-1).view(torch.uint8), ref.view(-1).view(torch.uint8))


@pytest.mark.ray
def test_object_store_buckets_give_back_every_tensor_bit_exactly_without_copying(ray_cluster):
    state = _llama_like_state()
    state["model.layers.0.mlp.down_proj.weight"] = torch.randn(8, 16).t()  # not contiguous
    buckets = put_buckets(state, 1024)
    assert len(buckets) > 1 and all(isinstance(entries, list) for entries, _ in buckets)
    got = fetch_buckets(buckets)
    flat = dict(pair for bucket in got for pair in bucket)
    assert list(flat) == list(state)  # each tensor once, in order
    for name, ref in state.items():
        assert flat[name].dtype == ref.dtype and flat[name].shape == ref.shape, name
        assert torch.equal(flat[name], ref), name
    # The tensors view the objects' shared memory: a second fetch maps the same bytes.
    again = dict(pair for bucket in fetch_buckets(buckets) for pair in bucket)
    assert all(again[n].data_ptr() == flat[n].data_ptr() for n in state)
    # The objects are snapshots: changing the source afterwards does not reach them.
    state["model.embed_tokens.weight"].add_(1.0)
    assert not torch.equal(flat["model.embed_tokens.weight"], state["model.embed_tokens.weight"])


def test_gloo_broadcast_gives_every_receiver_every_tensor_bit_exactly():
    state = _llama_like_state()
    port, got, errors = free_port(), {}, []

    def receive(rank):
        try:
            rx = WeightBroadcast("127.0.0.1", port, 3, rank, "gloo", timeout_s=60)
            got[rank] = [[(n, t.clone()) for n, t in bucket] for bucket in rx.receive()]
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=receive, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    sent = WeightBroadcast("127.0.0.1", port, 3, 0, "gloo", timeout_s=60).send(state, 1024)
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for rank in (1, 2):
        assert len(got[rank]) == sent > 1
        flat = dict(pair for bucket in got[rank] for pair in bucket)
        assert flat.keys() == state.keys()
        for name, ref in state.items():
            assert flat[name].dtype == ref.dtype and torch.equal(flat[name], ref), name


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
def test_two_zero3_policy_ranks_sync_two_engines_over_gloo(tmp_path, tiny_dir, ray_cluster):
    """One training step, then the bucketed gloo broadcast from policy rank 0: both engines
    report the new version and sample with the trainer's weights (logprob gap ~ 0)."""
    cfg = rl_config(
        tmp_path,
        "rl.algorithm=grpo",
        "rl.policy.num_actors=2",
        "rl.reference.num_actors=2",  # colocated with the policy in tiny_cpu.yaml
        "rl.policy.zero_stage=3",
        "rl.rollout.num_engines=2",
        "rl.rollout.weight_sync=gloo",
        "rl.rollout.weight_bucket_mb=0.05",  # several buckets for the tiny model
        "rl.policy.cpus_per_actor=0.25",
        "rl.reference.cpus_per_actor=0.25",
        "rl.rollout.cpus_per_engine=0.25",
        "rl.policy.warmup_steps=0",
    )
    assert cfg.rl.weight_sync_backend == "gloo"
    # A score that differs within groups, so GRPO's advantages (and the update) are not zero.
    run = RLRun(
        cfg, str(tiny_dir), None, reward_fn=lambda prompt, response, label: len(response) % 2
    )
    try:
        run.step(0)
        assert run.version == 1
        assert ray.get([e.version.remote() for e in run.groups["rollout"].actors]) == [1, 1]
        assert run.sync_stats["weight_sync/buckets"] > 1
        # Step 2 samples with the weights step 1 trained and synced; the trainer's logprobs of
        # those samples are the engines' (float32 on both sides).
        m2 = run.step(1)
        assert m2["rollout/logprob_gap"] < 1e-3, m2["rollout/logprob_gap"]
        assert m2["kl/mean_per_token"] != 0.0  # the policy moved away from the reference
        assert ray.get([e.version.remote() for e in run.groups["rollout"].actors]) == [2, 2]
        assert all(n > 0 for n in run.dispatcher.served), run.dispatcher.served
    finally:
        run.shutdown()


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
def test_object_store_sync_in_buckets_gives_the_engine_a_tied_models_trained_weights(
    tmp_path, ray_cluster
):
    """A model whose output head is its input embedding, trained one step and synced through the
    object store in several buckets (fused q/k/v and gate/up groups whole): the engine samples
    with exactly the trainer's weights (logprob gap ~ 0). The tied head is sent too: vLLM's CPU
    build keeps a packed copy of the output head that only reloading `lm_head.weight` renews."""
    tied_dir = ensure_tiny_model(tmp_path / "tied", seed=0, tie_word_embeddings=True, **TINY)
    cfg = rl_config(
        tmp_path,
        "rl.algorithm=grpo",
        "rl.rollout.weight_sync=object_store",
        "rl.rollout.weight_bucket_mb=0.05",  # several buckets for the tiny model
        "rl.policy.warmup_steps=0",
    )
    run = RLRun(
        cfg, str(tied_dir), None, reward_fn=lambda prompt, response, label: len(response) % 2
    )
    try:
        run.step(0)
        stats = run.sync_stats
        assert stats["weight_sync/buckets"] > 1 and stats["weight_sync/reload_s"] > 0
        assert ray.get([e.version.remote() for e in run.groups["rollout"].actors]) == [1]
        # What the engine was sent: the policy's weights, bit for bit.
        sent = ray.get(run.groups["policy"].call_async("weights_ref", int(0.05 * 2**20)))[0]
        flat = dict(pair for bucket in fetch_buckets(sent["buckets"]) for pair in bucket)
        policy = ray.get(run.groups["policy"].call_async("full_weights"))[0]
        assert torch.equal(policy["lm_head.weight"], policy["model.embed_tokens.weight"])  # tied
        assert flat.keys() == policy.keys()
        assert all(torch.equal(flat[k], policy[k]) for k in flat)
        # Step 2 samples with the weights step 1 trained and synced: the engine's logprobs of
        # its samples are the trainer's (float32 on both sides).
        m2 = run.step(1)
        assert m2["rollout/logprob_gap"] < 1e-3, m2["rollout/logprob_gap"]
        assert m2["kl/mean_per_token"] != 0.0  # the policy moved away from the reference
    finally:
        run.shutdown()
