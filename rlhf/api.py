"""The Python API: run the pipeline, or some of its stages, from a driver script.

    from rlhf import Pipeline

    def reward(prompt: str, response: str, label: str | None) -> float:
        return float(response.strip() == (label or "").strip())

    pipeline = Pipeline("configs/tiny_cpu.yaml", ["run.stages=[sft,rl]"], reward_fn=reward)
    result = pipeline.run()                    # every stage of run.stages, then the evaluation
    pipeline.outputs["sft"].model              # path of the SFT checkpoint (HF folder)
    result.stages["rl"].metrics["rl/reward/score_mean"]
    pipeline.run_stage("dpo")                  # one stage (its inputs: earlier stages' outputs)

The same code path as `rlhf run` (rlhf/driver.py): same outputs under `runs/<run.name>/`, same
resume and skip of finished stages. `reward_fn` is any callable `(prompt, response, label) ->
float` (a function, or an object with `__call__`); it runs in this process and replaces
`rl.reward.rule` (needs `rl.reward.kind=rule`). Ray is started (or joined) on first use and left
running for the next call; `close()` or a `with` block shuts it down. Importing this module does
not import Ray, vLLM or DeepSpeed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config import STAGES, Config, ConfigError, load_config

RewardFn = Callable[[str, str, "str | None"], float]


@dataclass
class StageResult:
    """What one stage left: its checkpoint, final metrics and wall time."""

    name: str
    model: str  # HF checkpoint folder
    metrics: dict[str, float]
    wall_s: float
    summary: dict = field(repr=False)  # the stage's done.json


@dataclass
class PipelineResult:
    """What `Pipeline.run` returns: each stage run, the evaluation, and the run folder."""

    run_dir: Path
    stages: dict[str, StageResult]
    evaluation: dict[str, Any]
    timings: dict[str, float]


def _with_overrides(cfg: Config, overrides: list[str]) -> Config:
    from pydantic import ValidationError

    from rlhf.config.load import _explain, _parse_scalar, _set_dotted

    tree = cfg.model_dump(mode="json")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. sft.lr=1e-4")
        _set_dotted(tree, key.strip(), _parse_scalar(raw))
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise _explain(err, "config + overrides " + " ".join(overrides)) from None


class Pipeline:
    """One run of the pipeline: a validated config, the stages' outputs, and Ray."""

    def __init__(
        self,
        config: Config | str | Path,
        overrides: list[str] | None = None,
        reward_fn: RewardFn | None = None,
    ) -> None:
        if isinstance(config, Config):
            self.cfg = _with_overrides(config, overrides) if overrides else config
        else:
            self.cfg = load_config(config, overrides)
        if reward_fn is not None:
            from rlhf.rl.rewards import reward_fn_problem

            problem = reward_fn_problem(reward_fn, self.cfg.rl.reward.kind)
            if problem:
                raise ConfigError(problem)
        self.reward_fn = reward_fn
        self.outputs: dict[str, StageResult] = self._finished()
        self.evaluation: dict[str, Any] = {}
        self._base: str | None = None

    @property
    def run_dir(self) -> Path:
        return self.cfg.run.dir

    def _finished(self) -> dict[str, StageResult]:
        """Stages an earlier run of this config already finished (their done.json)."""
        found = {}
        for stage in STAGES:
            done = self.cfg.run.dir.resolve() / stage / "done.json"
            if done.is_file():
                found[stage] = _result(stage, json.loads(done.read_text()))
        return found

    def _check(self, stages: list[str]) -> None:
        for stage in stages:
            if stage not in self.cfg.run.stages:
                raise ConfigError(
                    f"stage {stage!r} is not in run.stages = {self.cfg.run.stages}: add it "
                    "there (its data are checked with the config)"
                )

    def _start(self) -> str:
        from rlhf.driver import base_model
        from rlhf.runtime import init_ray

        ray = self.cfg.ray
        init_ray(
            address=ray.address,
            num_cpus=ray.num_cpus,
            object_store_memory_gb=ray.object_store_memory_gb,
            dashboard=ray.dashboard,
        )
        if self._base is None:
            self._base = base_model(self.cfg)
        return self._base

    def run(self, stages: list[str] | None = None) -> PipelineResult:
        """Run `stages` (default: all of run.stages, in order), then evaluate every policy."""
        from rlhf.driver import run_pipeline

        todo = list(self.cfg.run.stages if stages is None else stages)
        self._check(todo)
        todo = [s for s in self.cfg.run.stages if s in todo]  # pipeline order
        models = {name: r.model for name, r in self.outputs.items()}
        summary = run_pipeline(self.cfg, self.reward_fn, todo, models)
        ran = {name: _result(name, info) for name, info in summary["stages"].items()}
        self.outputs.update(ran)
        self.evaluation = summary["evaluation"]
        return PipelineResult(
            run_dir=Path(summary["run"]),
            stages=ran,
            evaluation=self.evaluation,
            timings=summary["timings"],
        )

    def run_stage(self, name: str) -> StageResult:
        """Run one stage (no evaluation); its input is the latest earlier stage's output."""
        from rlhf.driver import run_one_stage

        self._check([name])
        base = self._start()
        models = {stage: r.model for stage, r in self.outputs.items()}
        self.outputs[name] = _result(
            name, run_one_stage(self.cfg, name, models, base, self.reward_fn)
        )
        return self.outputs[name]

    def close(self) -> None:
        """Disconnect from Ray (an embedded cluster stops)."""
        from rlhf.runtime import shutdown_ray

        shutdown_ray()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _result(name: str, info: dict) -> StageResult:
    return StageResult(
        name=name,
        model=info["model"],
        metrics=dict(info.get("metrics", {})),
        wall_s=float(info.get("wall_s", 0.0)),
        summary=info,
    )
