"""The root of the tree (`Config`: one section per stage and role, the checks across sections, the
fingerprint) and `load_config`: defaults <- YAML file <- dotted overrides, then validation.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from rlhf.config.base import STAGES, ConfigError, ModelConfig, RayConfig, RunConfig, Section
from rlhf.config.lifecycle import DeployConfig, EvalConfig, JudgeConfig, ServeConfig
from rlhf.config.monitor import MonitorConfig
from rlhf.config.rl import RLConfig
from rlhf.config.stages import DPOConfig, PretrainConfig, RewardModelConfig, SFTConfig


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rm: RewardModelConfig = Field(default_factory=RewardModelConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    @model_validator(mode="after")
    def _columns_name_format_fields(self) -> Config:
        from rlhf.data.formats import FORMAT_KEYS, PREFERENCE_FORMATS, SFT_FORMATS

        def fields(formats: tuple[str, ...]) -> set[str]:
            return set().union(*(FORMAT_KEYS[f][0] | FORMAT_KEYS[f][1] for f in formats))

        for key, formats in [
            ("sft", SFT_FORMATS),
            ("rm", PREFERENCE_FORMATS),
            ("dpo", PREFERENCE_FORMATS),
            ("rl", ("prompts",)),
            ("eval", ("prompts",)),
        ]:
            known = fields(formats)
            for name in getattr(self, key).columns:
                if name not in known:
                    raise ValueError(
                        f"{key}.columns: {name!r} is not a field of its formats {sorted(known)}"
                    )
        return self

    @model_validator(mode="after")
    def _stages_in_order(self) -> Config:
        order = [s for s in STAGES if s in self.run.stages]
        if order != list(self.run.stages):
            raise ValueError(f"run.stages={self.run.stages} must follow pipeline order {order}")
        for stage in self.run.stages:
            if stage == "pretrain" and not self.pretrain.sources:
                raise ValueError("pretrain.sources is empty: the stage has no data")
            if stage == "rl":
                if not self.rl.prompt_files:
                    raise ValueError("rl.prompt_files is empty: the stage has no prompts")
                if (
                    self.rl.reward.kind == "model"
                    and not self.rl.reward.model_path
                    and "rm" not in self.run.stages
                ):
                    raise ValueError(
                        "rl.reward.kind='model' needs run.stages to include rm, or "
                        "rl.reward.model_path"
                    )
            elif stage != "pretrain" and not getattr(self, stage).train_files:
                raise ValueError(f"{stage}.train_files is empty: the stage has no data")
        return self

    def fingerprint(self) -> str:
        """Short hash of every setting; stored in checkpoint manifests."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---- loading -----------------------------------------------------------------------------------


def _parse_scalar(text: str) -> Any:
    """YAML-parse a command-line value; also accept `1e-4`, which YAML 1.1 leaves as a string."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, prefix + name + "."))
    return keys


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _explain(err: ValidationError, source: str) -> ConfigError:
    keys = _known_keys(Config)
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{key}: unknown key{hint}")
        else:
            shown = e.get("input")
            value = "" if isinstance(shown, dict) else f" = {shown!r}"
            lines.append(f"{key or '<root>'}{value}: {e['msg']}")
    return ConfigError(f"invalid config ({source}):\n  " + "\n  ".join(lines))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted `key=value` overrides, then validate."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. sft.lr=1e-4")
        _set_dotted(tree, key.strip(), _parse_scalar(raw))
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise _explain(err, source) from None
