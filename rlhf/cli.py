"""Command line: `rlhf run CONFIG [key=value ...]` runs the pipeline; `rlhf config` shows it.

    rlhf run configs/tiny_cpu.yaml                       # what `make demo` runs
    rlhf run configs/tiny_cpu.yaml sft.lr=1e-4 run.stages=[sft,dpo]
    rlhf config configs/tiny_cpu.yaml dpo.loss=ipo       # print the validated config as YAML
    rlhf eval configs/tiny_cpu.yaml --model sft=runs/tiny_cpu/sft/model \
        --model rl=runs/tiny_cpu/rl/model                # held-out accuracy, paired tests

User mistakes (bad config, bad data, unusable checkpoints, a diverging run) end with one clear
`error:` message and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from rlhf.config import ConfigError, load_config


def _user_errors() -> tuple[type[BaseException], ...]:
    from rlhf.data import DataError
    from rlhf.train.checkpoint import CheckpointError
    from rlhf.train.trainer import StageFailedError

    return (ConfigError, DataError, CheckpointError, StageFailedError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("run", "run the pipeline"), ("config", "print the resolved config")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML file of overrides, e.g. configs/tiny_cpu.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.lr=1e-4")
    p = sub.add_parser(
        "eval", help="score policies on the held-out prompts, each against the first"
    )
    p.add_argument(
        "config",
        help="YAML file naming the held-out files (sft.eval_files, "
        "eval.prompt_files) and eval.* settings",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.samples=16")
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a policy checkpoint (HF folder); the first is the baseline",
    )
    p.add_argument("--reward-model", metavar="PATH", help="also judge answers with this RM")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            return 0
        if args.command == "eval":
            return _eval(cfg, args.model, args.reward_model)
        from rlhf.driver import run_pipeline

        run_pipeline(cfg)
        return 0
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _eval(cfg, models: list[str], rm_dir: str | None) -> int:
    import json
    from pathlib import Path

    from rlhf.evaluate import evaluate_policies

    policies: dict[str, str] = {}
    for spec in models:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model {spec!r}: expected NAME=PATH, e.g. sft=runs/x/sft/model")
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"--model {spec!r}: {path} is not a saved model (no config.json)")
        if name in policies:
            raise ConfigError(f"--model {spec!r}: the name {name!r} is given twice")
        policies[name] = path
    names = list(policies)
    results = evaluate_policies(cfg, policies, names[0], names[1:], rm_dir)
    if not results:
        raise ConfigError("no held-out prompts: set sft.eval_files or eval.prompt_files")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
