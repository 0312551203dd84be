"""Command line: `rlhf run CONFIG [key=value ...]` runs the pipeline; `rlhf config` shows it.

    rlhf run configs/tiny_cpu.yaml                       # what `make demo` runs
    rlhf run configs/tiny_cpu.yaml sft.lr=1e-4 run.stages=[sft,dpo]
    rlhf config configs/tiny_cpu.yaml dpo.loss=ipo       # print the validated config as YAML
    rlhf eval configs/tiny_cpu.yaml --model sft=runs/tiny_cpu/sft/model \
        --model rl=runs/tiny_cpu/rl/model                # held-out accuracy, paired tests
    rlhf report runs/tiny_cpu                            # rebuild runs/tiny_cpu/report.html
    rlhf serve configs/tiny_cpu.yaml --model runs/tiny_cpu/rl/model   # also: feedback, sample, deploy
    rlhf label configs/tiny_cpu.yaml --answers A.jsonl --judge model=M --out pairs.jsonl  # RLAIF
    rlhf eval-judge configs/tiny_cpu.yaml --model sft=S --model rl=R --judge rule  # win rate, safety
    rlhf kuberay configs/qwen2.5_1.5b_gpu.yaml --image IMG   # a KubeRay RayJob (--cluster: RayCluster)

User mistakes (bad config, bad data, unusable checkpoints, a diverging run) end with one clear
`error:` message and exit code 2, not a traceback. A run the monitor paused (rlhf/monitor.py) exits
with code 3 and a paragraph saying why and how to go on.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from rlhf import judge_commands
from rlhf.cli_args import add_config_args, parse_model_specs
from rlhf.config import ConfigError, load_config
from rlhf.serve import commands as serve_commands


def _user_errors() -> tuple[type[BaseException], ...]:
    from rlhf.data import DataError
    from rlhf.monitor import MonitorStop
    from rlhf.report import ReportError
    from rlhf.rl.dispatch import StaleEngineError
    from rlhf.rl.rewards import RewardError
    from rlhf.rl.trainer import RLStageError
    from rlhf.serve.db import DatabaseError
    from rlhf.train.checkpoint import CheckpointError
    from rlhf.train.core import NonFiniteError
    from rlhf.train.trainer import StageFailedError

    return (
        ConfigError,
        DataError,
        CheckpointError,
        StageFailedError,
        MonitorStop,
        ReportError,
        DatabaseError,
        RLStageError,
        StaleEngineError,
        RewardError,
        NonFiniteError,
    )


def exit_status(exc: BaseException) -> int | None:
    """Print how an expected ending went and return its exit code: 3 for a monitor pause (the
    paragraph saying why and how to go on), 2 for a user error; None: a bug, let it raise."""
    from rlhf.monitor import PausedRun

    if isinstance(exc, PausedRun):
        print(str(exc), file=sys.stderr)
        return 3
    if isinstance(exc, _user_errors()):
        # Raised in an actor, it arrives as a Ray task error that is also the original type
        # and whose text is the remote traceback; `cause` holds the original message.
        cause = getattr(exc, "cause", None)
        print(f"error: {cause if isinstance(cause, BaseException) else exc}", file=sys.stderr)
        return 2
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("run", "run the pipeline"), ("config", "print the resolved config")]:
        add_config_args(sub.add_parser(name, help=help_text), "sft.lr=1e-4")
    p = sub.add_parser(
        "eval", help="score policies on the held-out prompts, each against the first"
    )
    add_config_args(
        p,
        "eval.samples=16",
        "YAML file naming the held-out files (sft.eval_files, eval.prompt_files) and eval.* "
        "settings",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a policy checkpoint (HF folder); the first is the baseline",
    )
    p.add_argument("--reward-model", metavar="PATH", help="also judge answers with this RM")
    p = sub.add_parser("report", help="rebuild a run's report.html from its files")
    p.add_argument("run_dir", help="a run folder, e.g. runs/tiny_cpu")
    serve_commands.add_parsers(sub)
    judge_commands.add_parsers(sub)
    from rlhf import kuberay

    kuberay.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            from rlhf.report import build_report

            print(build_report(args.run_dir))
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command in judge_commands.COMMANDS:
            return judge_commands.run_command(cfg, args)
        if args.command in serve_commands.COMMANDS:
            return serve_commands.run_command(cfg, args)
        if args.command == "kuberay":
            from rlhf import kuberay

            return kuberay.run_command(cfg, args)
        if args.command == "config":
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            return 0
        if args.command == "eval":
            return _eval(cfg, args.model, args.reward_model)
        from rlhf.driver import run_pipeline

        run_pipeline(cfg)
        return 0
    except Exception as exc:
        code = exit_status(exc)
        if code is None:
            raise
        return code


def _eval(cfg, models: list[str], rm_dir: str | None) -> int:
    import json

    from rlhf.evaluate import evaluate_policies

    policies = parse_model_specs(models)
    names = list(policies)
    results = evaluate_policies(cfg, policies, names[0], names[1:], rm_dir)
    if not results:
        raise ConfigError("no held-out prompts: set sft.eval_files or eval.prompt_files")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
