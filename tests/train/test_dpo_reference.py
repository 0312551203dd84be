"""DPO with the reference's logprobs precomputed with the data (dpo.precompute_reference) gives
the losses, metrics and gradients of the live reference held in the engine."""

from pathlib import Path

import pytest
import torch

from rlhf.config import load_config
from rlhf.models.factory import ensure_tiny_model
from rlhf.train.tasks import TASKS, PolicyWithReference

REPO = Path(__file__).resolve().parents[2]
TINY = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64)
SMALL = [f"model.tiny.{k}={v}" for k, v in TINY.items()] + [
    "run.stages=[dpo]",
    "dpo.micro_batch_size=8",
    "dpo.global_batch_size=16",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """48 training pairs and 16 held-out ones of the bundled files: quick to score."""
    out = tmp_path_factory.mktemp("dpo_pairs")
    for name, source, n in (("train", "pairwise", 48), ("eval", "pairwise_eval", 16)):
        lines = (REPO / f"rlhf/data/samples/{source}.jsonl").read_text().splitlines()[:n]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(ensure_tiny_model(tmp_path_factory.mktemp("dpo_ref") / "tiny", seed=0, **TINY))


@pytest.fixture
def dpo_config(files):
    def make(out, *extra):
        data = [
            f"dpo.train_files=[{{path: {files / 'train.jsonl'}}}]",
            f"dpo.eval_files=[{{path: {files / 'eval.jsonl'}}}]",
        ]
        return load_config(
            REPO / "configs/tiny_cpu.yaml",
            [f"run.output_dir={out}", "run.name=t", *SMALL, *data, *extra],
        )

    return make


def _moved(model: torch.nn.Module) -> torch.nn.Module:
    """The same nudge to every policy, so it differs from its reference (a policy equal to its
    reference has loss log 2 whatever reference logprobs it is given)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def test_precomputed_reference_gives_the_live_reference_loss_metrics_and_gradient(
    tmp_path, model_dir, dpo_config
):
    live_cfg = dpo_config(tmp_path / "live")
    pre_cfg = dpo_config(tmp_path / "pre", "dpo.precompute_reference=true")
    live, pre = TASKS["dpo"](live_cfg), TASKS["dpo"](pre_cfg)
    train_live, eval_live, _ = live.prepare_data(live_cfg, model_dir)
    train_pre, eval_pre, report = pre.prepare_data(pre_cfg, model_dir)
    assert report["reference_logprobs"]["precomputed"] is True
    assert (
        "ref_chosen_logp" in train_pre.column_names and "ref_chosen_logp" in eval_pre.column_names
    )
    assert "ref_chosen_logp" not in train_live.column_names

    m_live = _moved(live.build_model(live_cfg, model_dir).policy)
    m_pre = _moved(pre.build_model(pre_cfg, model_dir))
    assert not isinstance(m_pre, PolicyWithReference)  # the engine would hold the policy alone
    reference = live.build_model(live_cfg, model_dir).reference
    both = PolicyWithReference(m_live, reference)

    # Rows in another order and grouping than the precomputation's batches (other padding).
    rows = [17, 3, 40, 42, 29, 8, 21, 44]
    batch_live = live.collate([train_live[i] for i in rows])
    batch_pre = pre.collate([train_pre[i] for i in rows])
    assert batch_pre["ref_logps"].shape == (16,) and "ref_logps" not in batch_live
    loss_live, metrics_live = live.loss(both, batch_live, 8)
    loss_pre, metrics_pre = pre.loss(m_pre, batch_pre, 8)
    assert loss_live.item() > 0.05  # not a degenerate case
    torch.testing.assert_close(loss_pre, loss_live, rtol=1e-5, atol=1e-6)
    assert metrics_pre == pytest.approx(metrics_live, rel=1e-5, abs=1e-6)
    loss_live.backward()
    loss_pre.backward()
    grads = zip(m_live.named_parameters(), m_pre.named_parameters())
    for (name, p_live), (_, p_pre) in grads:
        torch.testing.assert_close(p_pre.grad, p_live.grad, rtol=1e-4, atol=1e-6, msg=name)

    with torch.no_grad():
        sums_live = live.eval_sums(both, live.collate([eval_live[i] for i in range(16)]))
        sums_pre = pre.eval_sums(m_pre, pre.collate([eval_pre[i] for i in range(16)]))
    assert sums_pre == pytest.approx(sums_live, rel=1e-5, abs=1e-6)


def test_precompute_reference_with_data_prepared_without_it_names_the_folder(
    tmp_path, model_dir, dpo_config
):
    live_cfg = dpo_config(tmp_path / "a")
    pre_cfg = dpo_config(tmp_path / "a", "dpo.precompute_reference=true")
    train, _, _ = TASKS["dpo"](live_cfg).prepare_data(live_cfg, model_dir)
    task = TASKS["dpo"](pre_cfg)
    policy = task.build_model(pre_cfg, model_dir)
    with pytest.raises(ValueError, match=r"carry no reference logprobs.*dpo/data"):
        task.loss(policy, task.collate([train[0], train[1]]), 2)


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_a_dpo_stage_on_precomputed_reference_logprobs_reports_the_live_reference_eval(
    tmp_path, model_dir, dpo_config, ray_cluster
):
    """The whole stage (data saved with the logprobs, Ray Train workers, the engine holding the
    policy alone): its held-out metrics after 2 steps are those of its exported policy scored
    against the live reference here."""
    import json

    from transformers import AutoModelForCausalLM

    from rlhf.train.loop import evaluate
    from rlhf.train.trainer import run_stage

    cfg = dpo_config(
        tmp_path,
        "dpo.precompute_reference=true",
        "dpo.num_workers=1",
        "dpo.max_steps=2",
        "dpo.warmup_steps=0",
        "dpo.lr=1e-3",
        "dpo.eval_interval=2",
        "dpo.save_interval=2",
        "dpo.log_interval=1",
    )
    summary = run_stage(cfg, "dpo", model_dir)
    stage_dir = Path(summary["model"]).parent
    assert json.loads((stage_dir / "data/report.json").read_text())["reference_logprobs"]
    lines = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if x.get("step") == 2][0]

    live_cfg = dpo_config(tmp_path / "live")
    live = TASKS["dpo"](live_cfg)
    _, eval_rows, _ = live.prepare_data(live_cfg, model_dir)
    trained = AutoModelForCausalLM.from_pretrained(summary["model"])
    both = PolicyWithReference(trained, live.build_model(live_cfg, model_dir).reference)
    ev = evaluate(live, both, eval_rows, rank=0, world=1, batch_size=8)
    assert abs(ev["margin"]) > 1e-4  # the policy has left its reference (margin 0 at the start)
    assert logged["dpo/eval_loss"] == pytest.approx(ev["loss"], rel=1e-5, abs=1e-6)
    assert logged["dpo/eval_accuracy"] == pytest.approx(ev["accuracy"], abs=1e-9)
    assert logged["dpo/eval_margin"] == pytest.approx(ev["margin"], rel=1e-4, abs=1e-6)
