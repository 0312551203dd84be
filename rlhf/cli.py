"""Command line: `rlhf run CONFIG [key=value ...]` runs the pipeline; `rlhf config` shows it.

    rlhf run configs/tiny_cpu.yaml                       # what `make demo` runs
    rlhf run configs/tiny_cpu.yaml sft.lr=1e-4 run.stages=[sft,dpo]
    rlhf config configs/tiny_cpu.yaml dpo.loss=ipo       # print the validated config as YAML

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
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            return 0
        from rlhf.driver import run_pipeline

        run_pipeline(cfg)
        return 0
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
