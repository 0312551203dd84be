"""The `rlhf serve`, `rlhf feedback export` and `rlhf sample` subcommands (wired in rlhf/cli.py).

    rlhf serve configs/tiny_cpu.yaml --model runs/tiny_cpu/rl/model [--port 8000] [--token T]
        [--replicas N]                 # Ctrl-C stops it
    rlhf feedback export configs/tiny_cpu.yaml --out runs/tiny_cpu/feedback [--db URL]
    rlhf sample configs/tiny_cpu.yaml --model runs/tiny_cpu/sft/model --prompts p.jsonl \
        --k 4 --out to_rank.jsonl
    rlhf deploy configs/tiny_cpu.yaml --model runs/tiny_cpu/dpo/model [--force]   # gate + swap
"""

from __future__ import annotations

import json
import secrets
import signal
import sys
import time
from pathlib import Path

from rlhf.cli_args import add_config_args
from rlhf.config import ConfigError

COMMANDS = ("serve", "feedback", "sample", "deploy")


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="serve a policy over HTTP (Ray Serve, OpenAI-compatible)")
    add_config_args(p, "serve.max_tokens=32")
    p.add_argument("--model", required=True, help="the policy checkpoint (HF folder)")
    p.add_argument("--port", type=int, help="HTTP port (default: serve.port)")
    p.add_argument("--token", help="bearer token (default: serve.token, else a new random one)")
    p.add_argument("--replicas", type=int, help="fixed number of replicas (no autoscaling)")
    p = sub.add_parser("feedback", help="feedback collected by `rlhf serve`")
    fsub = p.add_subparsers(dest="feedback_command", required=True)
    e = fsub.add_parser("export", help="write pairwise / ranked preference files and a report")
    add_config_args(e, "serve.max_tokens=32")
    e.add_argument("--db", help="database URL (default: serve.database_url, else the run's SQLite)")
    e.add_argument("--out", required=True, help="output folder")
    p = sub.add_parser("sample", help="K answers per prompt into a ranked-list file to fill in")
    add_config_args(p, "serve.max_tokens=32")
    p.add_argument("--model", required=True, help="the policy checkpoint (HF folder)")
    p.add_argument("--prompts", required=True, help="{prompt, label?} records (JSONL, ...)")
    p.add_argument("--k", type=int, default=4, help="answers per prompt (default 4)")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p = sub.add_parser("deploy", help="swap the served policy for a new one that passes the gate")
    add_config_args(p, "deploy.min_win_rate=0.55")
    p.add_argument("--model", required=True, help="the candidate policy checkpoint (HF folder)")
    p.add_argument("--force", action="store_true", help="skip the gate (e.g. a rollback)")


def _model_dir(path: str) -> str:
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"--model {path}: not a saved model (no config.json)")
    return path


def run_command(cfg, args) -> int:
    if args.command == "deploy":
        from rlhf.serve.deploy import deploy

        decision = deploy(cfg, _model_dir(args.model), force=args.force)
        print(json.dumps(decision, indent=1))
        if not decision["deployed"]:
            print("refused: " + "; ".join(decision["refused_because"]), file=sys.stderr)
        return 0 if decision["deployed"] else 1
    if args.command == "sample":
        from rlhf.sample import sample_for_ranking

        report = sample_for_ranking(cfg, _model_dir(args.model), args.prompts, args.k, args.out)
        print(json.dumps(report, indent=1))
        return 0
    if args.command == "feedback":
        from rlhf.serve.db import default_url
        from rlhf.serve.export import export_feedback

        url = args.db or cfg.serve.database_url or default_url(cfg.run.dir)
        print(json.dumps(export_feedback(url, args.out), indent=1))
        return 0
    return _serve(cfg, args)


def _serve(cfg, args) -> int:
    from ray import serve

    from rlhf.serve.app import start_app

    if args.replicas is not None and args.replicas < 1:
        raise ConfigError(f"--replicas {args.replicas}: must be at least 1")
    token = args.token or cfg.serve.token or secrets.token_urlsafe(24)
    base, version = start_app(
        cfg, _model_dir(args.model), token, port=args.port, replicas=args.replicas
    )
    print(f"serving {version} at {base}/v1 (Ctrl-C stops)")
    print(f"token: {token}")
    print(f'  curl -H "Authorization: Bearer {token}" {base}/v1/models', flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background
        signal.signal(sig, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown
        print("stopping: replicas finish their requests", flush=True)
        serve.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
