"""Arguments every `rlhf` subcommand parses the same way (the command modules share them).

add_config_args(parser, "serve.max_tokens=32")   # CONFIG [key=value ...]
policies = parse_model_specs(["sft=runs/x/sft/model", "rl=runs/x/rl/model"])
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhf.config import ConfigError


def add_config_args(p: argparse.ArgumentParser, example: str, config_help: str = "") -> None:
    """The positional CONFIG and dotted overrides; `example` shows one override."""
    p.add_argument(
        "config", help=config_help or "YAML file of overrides, e.g. configs/tiny_cpu.yaml"
    )
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")


def parse_model_specs(specs: list[str]) -> dict[str, str]:
    """`--model NAME=PATH` values -> {name: path}, in order; each PATH must be a saved model."""
    policies: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model {spec!r}: expected NAME=PATH, e.g. sft=runs/x/sft/model")
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"--model {spec!r}: {path} is not a saved model (no config.json)")
        if name in policies:
            raise ConfigError(f"--model {spec!r}: the name {name!r} is given twice")
        policies[name] = path
    return policies
