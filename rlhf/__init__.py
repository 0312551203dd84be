"""rlhf: the whole post-training lifecycle (pretrain, SFT, reward model, DPO, RL) on Ray.

    from rlhf import Pipeline, load_config
    Pipeline("configs/tiny_cpu.yaml", ["run.stages=[sft,rl]"], reward_fn=my_reward).run()

Names are imported on first use (PEP 562), so `import rlhf` stays light: no Ray, vLLM, DeepSpeed
or torch until a stage runs. See rlhf/api.py for the API and rlhf/cli.py for the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlhf.api import Pipeline, PipelineResult, StageResult
    from rlhf.config import Config, ConfigError, load_config

_EXPORTS = {
    "Pipeline": "rlhf.api",
    "PipelineResult": "rlhf.api",
    "StageResult": "rlhf.api",
    "Config": "rlhf.config",
    "ConfigError": "rlhf.config",
    "load_config": "rlhf.config",
}
__all__ = ["Config", "ConfigError", "Pipeline", "PipelineResult", "StageResult", "load_config"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
