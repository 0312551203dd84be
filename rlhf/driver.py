"""The pipeline: every stage in order, each one's checkpoint handed to the next, then a summary.

    rlhf run configs/tiny_cpu.yaml   # pretrain -> SFT -> reward model; SFT -> DPO; SFT -> PPO

Phases, each timed: start Ray, build (or locate) the base model, run the configured stages as Ray
Train jobs, evaluate the policies on held-out prompts, write `summary.json`, print a table and
write `report.html` (rlhf/report.py).
Stage inputs: pretrain starts from the base model; SFT from pretrain (else the base); the reward
model, DPO and RL from SFT (else the latest stage). `<stage>.init_from` overrides any of these.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf.config import Config


@contextmanager
def timed(timings: dict[str, float], name: str):
    t0 = time.time()
    print(f"== {name}", flush=True)
    yield
    timings[f"timing/{name}"] = round(time.time() - t0, 1)
    print(f"== {name} done in {timings[f'timing/{name}']:.1f}s", flush=True)


def base_model(cfg: Config) -> str:
    """The checkpoint the pipeline starts from: `model.path`, or the tiny model built from nothing."""
    from rlhf.models.factory import ensure_tiny_model

    if cfg.model.path:
        if not Path(cfg.model.path, "config.json").is_file():
            from rlhf.config import ConfigError

            raise ConfigError(f"model.path = {cfg.model.path!r}: no config.json there")
        return str(Path(cfg.model.path).resolve())  # workers run elsewhere (Ray Train's cwd)
    t = cfg.model.tiny
    path = cfg.run.dir.resolve() / "base"
    ensure_tiny_model(
        path,
        hidden_size=t.hidden_size,
        num_layers=t.num_layers,
        num_heads=t.num_heads,
        num_kv_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        seed=cfg.run.seed,
    )
    return str(path)


def stage_input(cfg: Config, stage: str, outputs: dict[str, str], base: str) -> str:
    explicit = getattr(cfg, stage).init_from
    if explicit:
        return str(Path(explicit).resolve())
    if stage == "sft":
        return outputs.get("pretrain", base)
    if stage in ("rm", "dpo", "rl"):
        return outputs.get("sft", outputs.get("pretrain", base))
    return base


def run_one_stage(
    cfg: Config, stage: str, outputs: dict[str, str], base: str, reward_fn: Any = None
) -> dict:
    """Train one stage from its input (see the module docstring); its done.json summary."""
    if stage == "rl":
        from rlhf.rl.stage import run_rl

        rm_dir = cfg.rl.reward.model_path or outputs.get("rm")
        return run_rl(cfg, stage_input(cfg, stage, outputs, base), rm_dir, reward_fn=reward_fn)
    from rlhf.train.trainer import run_stage

    return run_stage(cfg, stage, stage_input(cfg, stage, outputs, base))


def run_pipeline(
    cfg: Config,
    reward_fn: Any = None,
    stages: list[str] | None = None,
    outputs: dict[str, str] | None = None,
) -> dict:
    """Run `stages` (default: run.stages) and evaluate; `reward_fn` (prompt, response, label) ->
    float replaces rl.reward.rule; `outputs` (stage -> model) are earlier stages' checkpoints."""
    from rlhf.evaluate import evaluate_pipeline
    from rlhf.runtime import init_ray

    timings: dict[str, float] = {}
    run_dir = cfg.run.dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    with timed(timings, "ray"):
        init_ray(
            address=cfg.ray.address,
            num_cpus=cfg.ray.num_cpus,
            object_store_memory_gb=cfg.ray.object_store_memory_gb,
            dashboard=cfg.ray.dashboard,
        )
    with timed(timings, "base_model"):
        base = base_model(cfg)
    outputs = dict(outputs or {})
    results: dict[str, dict] = {}
    for stage in cfg.run.stages if stages is None else stages:
        with timed(timings, stage):
            results[stage] = run_one_stage(cfg, stage, outputs, base, reward_fn)
        outputs[stage] = results[stage]["model"]
    with timed(timings, "evaluate"):
        evaluation = evaluate_pipeline(cfg, base, outputs)
    summary = {"run": str(run_dir), "timings": timings, "stages": results, "evaluation": evaluation}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print_summary(summary)
    write_report(run_dir)
    return summary


def write_report(run_dir: Path) -> None:
    """`<run_dir>/report.html`; a failure is printed, never raised: the results are on disk."""
    try:
        from rlhf.report import build_report

        print(f"report: {build_report(run_dir)}", flush=True)
    except Exception as exc:  # a broken report must not lose a finished run
        print(f"warning: report.html not written: {type(exc).__name__}: {exc}", flush=True)


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rlhf run: {summary['run']}")
    for col in ("stage", "wall s", "key results"):
        table.add_column(col)
    for stage, info in summary["stages"].items():
        shown = {
            k.split("/", 1)[1]: v
            for k, v in info["metrics"].items()
            if "eval" in k or k.endswith("/loss")
        }
        text = ", ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items()))
        table.add_row(stage, f"{info['wall_s']:.0f}", text)
    for name, value in summary["evaluation"].items():
        table.add_row("eval", "", f"{name} = {value}")
    Console().print(table)
