"""The RL loop on a real local Ray cluster with real vLLM engines and DeepSpeed ranks."""

import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import ray
import torch

from rlhf.config import load_config
from rlhf.rl.dispatch import StaleEngineError
from rlhf.rl.experience import groups_with_signal
from rlhf.rl.stage import run_rl
from rlhf.rl.trainer import RLRun, RLStageError

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "rl.rollout.backend=vllm",  # the demo samples in the policy's actor; these tests run engines
    "model.tiny.hidden_size=64",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.num_kv_heads=2",
    "model.tiny.intermediate_size=64",
    "rl.prompts_per_step=4",
    "rl.samples_per_prompt=2",
    "rl.mini_batch_size=4",
    "rl.rollout.chunk_size=1",
    "rl.rollout.max_new_tokens=6",
    "rl.rollout.kv_cache_gb=0.05",
    "rl.eval_prompts=8",
    "rl.policy.lr=1e-3",
    "rl.policy.micro_batch_size=2",
    "rl.critic.micro_batch_size=2",
    "rl.filter_groups=false",
]


def rl_config(tmp_path, *extra):
    return load_config(
        REPO / "configs/tiny_cpu.yaml",
        [f"run.output_dir={tmp_path}", "run.name=t", "run.stages=[rl]", *SMALL, *extra],
    )


def _weight_buckets(run):
    """Policy rank 0's weights in the object store: [(entries, ref)] (what an engine loads)."""
    return ray.get(run.groups["policy"].call_async("weights_ref", 1 << 20))[0]["buckets"]


def _weights(buckets):
    from actors.weight_sync import fetch_buckets

    return {name: t.clone() for bucket in fetch_buckets(buckets) for name, t in bucket}


def test_ppo_two_engines_data_parallel_colocated(tmp_path, tiny_dir, ray_cluster):
    """PPO with a critic, a reward model, PPO-ptx, 2 policy ranks, 2 engines, colocation."""
    cfg = rl_config(
        tmp_path,
        "rl.algorithm=ppo",
        "rl.reward.kind=model",
        f"rl.reward.model_path={tiny_dir}",
        "rl.policy.num_actors=2",
        "rl.reference.num_actors=2",
        "rl.rollout.num_engines=2",
        "rl.ptx_coef=0.1",
        "rl.ptx_files=[{path: rlhf/data/samples/sft_io.jsonl}]",
        "rl.ptx_batch_size=2",
        "rl.colocate=[[policy, reference], [critic, reward_model]]",
        "rl.policy.cpus_per_actor=0.25",
        "rl.critic.cpus_per_actor=0.25",
        "rl.rollout.cpus_per_engine=0.25",
        # Full lr from the first update, so two updates move the policy far enough that an
        # engine left on the old weights shows a logprob gap above rl.rollout.max_logprob_gap.
        "rl.policy.warmup_steps=0",
    )
    run = RLRun(cfg, str(tiny_dir), reward_model_dir=str(tiny_dir))
    try:
        before_buckets = _weight_buckets(run)
        before = _weights(before_buckets)
        m1 = run.step(0)
        # Step 2 with dynamic sampling: the reward model's scores of a group always differ.
        run.rl = run.rl.model_copy(update={"filter_groups": True})
        m2 = run.step(1)
        assert (m2["filter/rounds"], m2["filter/padded_groups"]) == (1, 0)
        assert m2["compute/reward_s"] > 0 and "filter/rounds" not in m1
        for m in (m1, m2):
            for key in (
                "timing/generate",
                "timing/reward",
                "timing/ref",
                "timing/logprobs",
                "timing/values",
                "timing/advantages",
                "timing/train_critic",
                "timing/train_policy",
                "timing/weight_sync",
            ):
                assert m[key] >= 0, key
            assert torch.isfinite(
                torch.tensor(
                    [
                        m["critic/value_loss"],
                        m["ppo/clipfrac"],
                        m["policy/ptx_loss"],
                        m["policy/entropy"],
                    ]
                )
            ).all()
        # Step 2 sampled with the weights step 1 trained: the engines' logprobs are the trainer's.
        assert m2["rollout/logprob_gap"] < 1e-3
        assert m2["kl/mean_per_token"] != 0.0  # the policy moved away from the reference
        assert run.version == 2
        assert ray.get([e.version.remote() for e in run.groups["rollout"].actors]) == [2, 2]
        assert all(n > 0 for n in run.dispatcher.served), run.dispatcher.served
        after = _weights(_weight_buckets(run))
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert len(changed) > len(before) // 2

        # A stale engine cannot go unnoticed: put the old weights back into engine 0 under the
        # current version number; the next step's trainer/engine logprob gap stops the run.
        old = before_buckets
        ray.get(run.groups["rollout"].actors[0].load_weights.remote(old, run.version))
        with pytest.raises(StaleEngineError, match="logprob gap"):
            run.step(2)
        # And an engine that missed an update is caught by its version stamp.
        ray.get(run.groups["rollout"].actors[1].load_weights.remote(old, run.version - 1))
        with pytest.raises(StaleEngineError, match="missed a weight update"):
            run.step(3)
    finally:
        run.shutdown()


def _coin(text: str) -> float:
    """A fixed 0/1 score per text: splits a random policy's samples of a prompt half the time."""
    return float(zlib.crc32(text.encode()) % 2)


class _Scorer(BaseHTTPRequestHandler):
    rule = "exact"  # or "coin"

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.rule == "coin":
            rewards = [_coin(r) for r in body["responses"]]
        else:
            rewards = [float(r.strip() == y) for r, y in zip(body["responses"], body["labels"])]
        data = json.dumps({"rewards": rewards}).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_each_critic_free_estimator_over_http_rewards(tmp_path, tiny_dir, ray_cluster):
    """One set of actors; each estimator drives two steps (the estimator only changes the
    advantage phase, so the test swaps it between steps instead of restarting the actors)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Scorer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/score"
    cfg = rl_config(
        tmp_path,
        "rl.algorithm=grpo",
        "rl.reward.kind=http",
        f"rl.reward.url={url}",
        "rl.kl_in_reward=false",
        "rl.kl_estimator=k3",
        "rl.entropy_coef=0.01",
        "rl.truncated_is_cap=2.0",
    )
    run = RLRun(cfg, str(tiny_dir), reward_model_dir=None)
    try:
        assert "critic" not in run.groups and "reward_model" not in run.groups
        step = 0
        for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"):
            run.rl = run.rl.model_copy(update={"algorithm": name})
            for _ in range(2):
                m = run.step(step)
                step += 1
                assert "timing/values" not in m and "timing/train_critic" not in m
                assert m["rollout/logprob_gap"] < 1e-3, (name, m["rollout/logprob_gap"])
                assert 0.0 <= m["reward/score_mean"] <= 1.0
                assert m["policy/kl_loss"] >= 0.0
        assert run.version == step

        # Dynamic sampling. Under the coin reward about half the groups have scores that differ;
        # the batch takes those first, in full groups, and is topped up only when 3 rounds of
        # prompts did not find 4 of them.
        k, n = 4, 2
        _Scorer.rule = "coin"
        run.rl = run.rl.model_copy(
            update={"algorithm": "grpo", "filter_groups": True, "filter_max_rounds": 3}
        )
        cursor = run.prompt_cursor
        prompts, samples, _, scores, m = run._rollouts(step, {})
        rich = k - int(m["filter/padded_groups"])
        assert len(prompts) == k and len(samples) == len(scores) == k * n
        assert groups_with_signal(scores, n) == [True] * rich + [False] * (k - rich)
        assert rich == k or m["filter/rounds"] == 3
        assert run.prompt_cursor - cursor == k * m["filter/rounds"]
        assert [s.prompt_index for s in samples] == [i for i in range(k) for _ in range(n)]
        texts = [run.tok.decode(s.token_ids, skip_special_tokens=True) for s in samples]
        assert scores == [_coin(x) for x in texts]  # each score stayed with its sample
        m = run.step(step)
        step += 1
        assert m["filter/rounds"] >= 1 and m["rollout/logprob_gap"] < 1e-3
        assert m["reward/trained_score_mean"] == 0.5 or m["filter/padded_groups"] > 0
        # A reward that never varies: every round is spent and the batch is still full.
        _Scorer.rule = "exact"
        m = run.step(step)
        assert (m["filter/rounds"], m["filter/padded_groups"], m["filter/signal_frac"]) == (3, k, 0)
        assert m["reward/score_mean"] == 0.0 and m["response/length_mean"] > 0
    finally:
        _Scorer.rule = "exact"
        run.shutdown()
        srv.shutdown()


def test_the_transformers_rollout_backend_follows_the_policy(tmp_path, tiny_dir, ray_cluster):
    """GRPO with `rl.rollout.backend=transformers`: after every weight sync the engine's
    logprobs are the policy's (fp32, the same model code); full lr from the first update, so an
    engine left on older weights would show a gap."""
    cfg = rl_config(
        tmp_path,
        "rl.algorithm=grpo",
        "rl.rollout.backend=transformers",
        "rl.kl_in_reward=false",
        "rl.policy.warmup_steps=0",
        "rl.entropy_coef=0.05",  # a random model earns no reward: this moves it
    )
    run = RLRun(cfg, str(tiny_dir), reward_model_dir=None)
    try:
        (engine,) = run.groups["rollout"].actors
        steps = [run.step(step) for step in range(3)]
        assert all(m["rollout/logprob_gap"] < 1e-4 for m in steps), steps
        assert all(m["policy/kl_loss"] >= 0.0 for m in steps)
        assert ray.get(engine.version.remote()) == run.version == 3
        samples, _ = ray.get(engine.generate.remote([[2, 6, 7, 1, 4]], 2, 4, 1.0, 1.0, 0))
        assert [s.weights_version for s in samples] == [3, 3]
    finally:
        run.shutdown()


def test_the_policy_backend_samples_in_the_policys_actor_from_its_training_weights(
    tmp_path, tiny_dir, ray_cluster
):
    """GRPO with `rl.rollout.backend=policy`: no rollout actor; every step's samples come from
    the policy's current weights (the on-policy update's forward finds no gap at full lr) and
    carry the driver's version; the saved policy keeps its generation config."""
    from transformers import GenerationConfig

    cfg = rl_config(
        tmp_path,
        "rl.algorithm=grpo",
        "rl.rollout.backend=policy",
        "rl.kl_in_reward=false",
        "rl.policy.warmup_steps=0",
        "rl.entropy_coef=0.05",  # a random model earns no reward: this moves it
    )
    run = RLRun(cfg, str(tiny_dir), reward_model_dir=None)
    try:
        assert "rollout" not in run.groups
        (policy,) = run.groups["policy"].actors
        steps = [run.step(step) for step in range(3)]
        assert all(m["rollout/logprob_gap"] < 1e-4 for m in steps), steps
        assert steps[-1]["policy/version"] == run.version == 3
        samples, _ = ray.get(policy.generate.remote([[2, 6, 7, 1, 4]], 2, 4, 1.0, 1.0, 0))
        assert [s.weights_version for s in samples] == [3, 3]
        ray.get(policy.save.remote(str(tmp_path / "saved")))
    finally:
        run.shutdown()
    saved = GenerationConfig.from_pretrained(tmp_path / "saved")
    assert saved.to_dict() == GenerationConfig.from_pretrained(tiny_dir).to_dict()


def test_two_policy_ranks_each_sample_a_share_of_the_prompts_from_the_weights_they_train(
    tmp_path, tiny_dir, ray_cluster
):
    """`rl.rollout.backend=policy` with 2 policy ranks (DeepSpeed data parallel): each rank's
    actor is an engine and takes chunks of prompts; after every update both hold the new
    weights (the first mini-batch's forward, on each rank's own rows, finds no gap with the
    sampling logprobs of either), stamp the driver's version, and sample alike."""
    cfg = rl_config(
        tmp_path,
        "rl.algorithm=grpo",
        "rl.rollout.backend=policy",
        "rl.policy.num_actors=2",
        "rl.reference.num_actors=2",  # colocated with the policy in tiny_cpu.yaml
        "rl.kl_in_reward=false",
        "rl.policy.warmup_steps=0",
        "rl.entropy_coef=0.05",  # a random model earns no reward: this moves it
    )
    assert cfg.rl.old_logprobs_from_sampler  # two mini-batches: the sampler's are the old ones
    run = RLRun(cfg, str(tiny_dir), reward_model_dir=None)
    try:
        assert "rollout" not in run.groups
        ranks = run.groups["policy"].actors
        assert run.engine_actors() == ranks and len(ranks) == 2
        w0 = _weights(_weight_buckets(run))
        steps = [run.step(step) for step in range(2)]
        assert all(m["rollout/logprob_gap"] < 1e-4 for m in steps), steps
        assert min(run.dispatcher.served) > 0, run.dispatcher.served  # both ranks sampled
        assert sum(run.dispatcher.served) >= 2 * cfg.rl.prompts_per_step
        w2 = _weights(_weight_buckets(run))
        assert max((w2[k] - w0[k]).abs().max().item() for k in w0) > 1e-4  # it trained
        got = ray.get([r.generate.remote([[2, 6, 7, 1, 4]], 2, 4, 1.0, 1.0, 7) for r in ranks])
        (a, _), (b, _) = got
        assert [s.weights_version for s in a + b] == [run.version] * 4 and run.version == 2
        assert [s.token_ids for s in a] == [s.token_ids for s in b]
        for x, y in zip(a, b):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
    finally:
        run.shutdown()


def test_run_rl_saves_a_loadable_policy(tmp_path, tiny_dir, ray_cluster):
    from transformers import AutoModelForCausalLM

    # A random model never answers right (all-zero rewards, zero advantages): the entropy bonus
    # is what moves it here.
    cfg = rl_config(
        tmp_path,
        "rl.algorithm=rloo",
        "rl.max_steps=2",
        "rl.eval_interval=1",
        "rl.entropy_coef=0.05",
        "rl.eval_prompt_files=[{path: rlhf/data/samples/prompts_eval.jsonl}]",
    )
    result = run_rl(cfg, str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(result["model"])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    w = dict(model.named_parameters())
    assert any(not torch.equal(p, w[k]) for k, p in base.named_parameters())
    assert (Path(result["model"]) / "version.txt").read_text() == "2"
    lines = [json.loads(x) for x in (tmp_path / "t/rl/metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "step" in x]
    assert [x["step"] for x in steps] == [0, 1, 2]
    assert "rl/eval/reward_mean" in steps[0] and "rl/timing/weight_sync" in steps[-1]
    assert result["metrics"]["rl/before_reward_mean"] >= 0.0
    # A second call finds the finished stage and does not train again.
    assert run_rl(cfg, str(tiny_dir)) == result


def test_bad_setups_fail_before_training(tmp_path, tiny_dir, ray_cluster):
    cfg = rl_config(tmp_path, "rl.policy.cpus_per_actor=64", "rl.colocate=[]")
    with pytest.raises(RLStageError, match=r"roles need 6[5-9](\.\d+)? CPU .* cluster has 2"):
        RLRun(cfg, str(tiny_dir), None)
    cfg = rl_config(tmp_path, "rl.max_prompt_length=8")
    with pytest.raises(RLStageError, match="prompt 0 of rlhf/data/samples/prompts.jsonl has"):
        RLRun(cfg, str(tiny_dir), None)
    cfg = rl_config(tmp_path, "rl.reward.rule=nowhere:fn")
    with pytest.raises(RLStageError, match="cannot load"):
        RLRun(cfg, str(tiny_dir), None)
    # tiny_dir has 256 positions: 250 + 16 do not fit, named before any actor starts.
    cfg = rl_config(tmp_path, "rl.max_prompt_length=250", "rl.rollout.max_new_tokens=16")
    with pytest.raises(
        RLStageError,
        match=r"rl.max_prompt_length \+ rl.rollout.max_new_tokens = "
        r"250 \+ 16 = 266 exceeds the model's max_position_embeddings = 256",
    ):
        RLRun(cfg, str(tiny_dir), None)
