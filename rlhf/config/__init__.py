"""The one typed config tree: every setting of every stage, with a default and a one-line doc.

YAML files in `configs/` hold overrides only; the command line adds dotted overrides:

    cfg = load_config("configs/tiny_cpu.yaml", ["sft.lr=1e-4", "run.stages=[sft,dpo]"])

Validation is loud: an unknown key (with the closest valid key suggested), a wrong type or an
impossible combination raises `ConfigError` naming the key, the value and what was expected.
Nothing is rewritten behind the user's back; derived values are computed once, in properties.

The tree lives in modules by role: `base` (sections every stage uses), `stages` (the offline
training stages), `rl_roles`, `rl` and `rl_checks` (the online RL stage: its roles, its settings,
their validation), `lifecycle` (evaluation, judging, deploying, serving), `monitor` (the RL
stage's monitor rules) and `load` (the root `Config` and `load_config`). Import from here:
`from rlhf.config import Config, load_config`.
"""

from rlhf.config.base import (
    COLUMNS_DOC,
    PROMPT_FORMAT_DOC,
    STAGES,
    VLLM_CPU_HEAD_SIZES,
    ConfigError,
    DataFile,
    LoRAConfig,
    ModelConfig,
    PromptFormat,
    RayConfig,
    RunConfig,
    Section,
    TinyModelConfig,
    resolve_engine,
)
from rlhf.config.lifecycle import DeployConfig, EvalConfig, JudgeConfig, ServeConfig
from rlhf.config.load import Config, load_config
from rlhf.config.monitor import (
    MONITOR_RULES,
    DiversityRule,
    EntropyRule,
    KLRule,
    LengthRule,
    LogprobGapRule,
    MonitorAction,
    MonitorConfig,
    MonitorRule,
    NonFiniteRule,
    NoSignalRule,
    RewardHackingRule,
    RewardZScoreRule,
)
from rlhf.config.rl import RLConfig
from rlhf.config.rl_roles import (
    RL_ALGORITHMS,
    RL_ROLES,
    ReferenceConfig,
    RewardSourceConfig,
    RoleConfig,
    RolloutConfig,
    TrainRoleConfig,
)
from rlhf.config.stages import (
    DPOConfig,
    PretrainConfig,
    RewardModelConfig,
    SFTConfig,
    TrainStageConfig,
)

__all__ = [
    "COLUMNS_DOC",
    "MONITOR_RULES",
    "PROMPT_FORMAT_DOC",
    "RL_ALGORITHMS",
    "RL_ROLES",
    "STAGES",
    "VLLM_CPU_HEAD_SIZES",
    "Config",
    "ConfigError",
    "DPOConfig",
    "DataFile",
    "DeployConfig",
    "DiversityRule",
    "EntropyRule",
    "EvalConfig",
    "JudgeConfig",
    "KLRule",
    "LengthRule",
    "LoRAConfig",
    "LogprobGapRule",
    "ModelConfig",
    "MonitorAction",
    "MonitorConfig",
    "MonitorRule",
    "NoSignalRule",
    "NonFiniteRule",
    "PretrainConfig",
    "PromptFormat",
    "RLConfig",
    "RayConfig",
    "ReferenceConfig",
    "RewardHackingRule",
    "RewardModelConfig",
    "RewardSourceConfig",
    "RewardZScoreRule",
    "RoleConfig",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "Section",
    "ServeConfig",
    "TinyModelConfig",
    "TrainRoleConfig",
    "TrainStageConfig",
    "load_config",
    "resolve_engine",
]
