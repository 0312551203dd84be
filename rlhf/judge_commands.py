"""The `rlhf label` (RLAIF) and `rlhf eval-judge` subcommands (wired in rlhf/cli.py).

    rlhf label configs/tiny_cpu.yaml --answers answers.jsonl --out pairwise.jsonl \
        --judge model=runs/tiny_cpu/sft/model --judge rule [--prompts prompts.jsonl] \
        [--require-agreement]
    rlhf eval-judge configs/tiny_cpu.yaml --model sft=runs/tiny_cpu/sft/model \
        --model rl=runs/tiny_cpu/rl/model --judge rule [--pretrain-data DIR] [--out FILE]
"""

from __future__ import annotations

import json

from rlhf.cli_args import add_config_args, parse_model_specs

COMMANDS = ("label", "eval-judge")
JUDGE_HELP = (
    "model[=PATH] (AI judge, both orders), reward_model[=PATH] or rule[=NAME]; "
    "defaults from judge.*; repeatable"
)


def add_parsers(sub) -> None:
    p = sub.add_parser("label", help="RLAIF: judge pairs of sampled answers into preference data")
    add_config_args(p, "judge.batch_size=4")
    p.add_argument("--answers", required=True, help="`rlhf sample` output: {prompt, responses}")
    p.add_argument("--out", required=True, help="pairwise JSONL to write (+ <out>.report.json)")
    p.add_argument(
        "--judge", action="append", required=True, metavar="KIND[=VALUE]", help=JUDGE_HELP
    )
    p.add_argument("--prompts", help="{prompt, label} records: labels for the rule judge")
    p.add_argument(
        "--require-agreement", action="store_true", help="write only pairs all judges agree on"
    )
    p = sub.add_parser("eval-judge", help="win rate by a judge, safety refusals, alignment tax")
    add_config_args(p, "judge.batch_size=4")
    p.add_argument(
        "--model", action="append", required=True, metavar="NAME=PATH", help="first: the baseline"
    )
    p.add_argument("--judge", action="append", default=[], metavar="KIND[=VALUE]", help=JUDGE_HELP)
    p.add_argument("--pretrain-data", help="held-out pretraining blocks (saved dataset folder)")
    p.add_argument("--out", help="also write the results to this JSON file")


def run_command(cfg, args) -> int:
    if args.command == "label":
        from rlhf.judge import label_answers

        report = label_answers(
            cfg, args.answers, args.out, args.judge, args.prompts, args.require_agreement
        )
        print(json.dumps(report, indent=1))
        return 0
    from rlhf.judged_eval import default_pretrain_data, evaluate_judged, write_results

    policies = parse_model_specs(args.model)
    pretrain = args.pretrain_data or default_pretrain_data(cfg)
    write_results(evaluate_judged(cfg, policies, args.judge, pretrain), args.out)
    return 0
