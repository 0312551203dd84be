"""Held-out evaluation of policies: task accuracy (greedy and sampled), paired tests, win rates.

    results = evaluate_pipeline(cfg, base_dir, {"sft": ".../sft/model", "dpo": ".../dpo/model"})
    rlhf eval configs/tiny_cpu.yaml --model sft=runs/tiny_cpu/sft/model --model rl=runs/tiny_cpu/rl/model

Every policy answers the held-out prompts (`sft.eval_files`, then `eval.prompt_files`) greedily and,
with `eval.samples > 0`, by sampling; an answer is correct when it equals the reference answer
after stripping whitespace (the demo task's exact-match rule). DPO and RL policies are compared
with SFT on the same prompts: questions fixed and broken, exact McNemar and Wilcoxon p-values, and
win rate = (wins + ties / 2) / prompts, where a win is a question only the compared policy gets
right; when a reward model was trained it also judges the pair of greedy answers. Prompts are
rendered by `eval.prompt_format` with the rule SFT and RL use (rlhf/data/render.py). Answers come
from a vLLM engine (`eval.engine: vllm`, the default: a Ray task with the rollout engine's CPUs and
GPUs when Ray runs, so it works at 1B+ on a cluster) or from transformers in the driver.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf.answers import load_tokenizer, policies_answers
from rlhf.config import Config


def exact_match(answer: str, label: str) -> bool:
    return answer.strip() == label.strip()


def engine_resources(cfg: Config) -> dict[str, float]:
    """What one evaluation engine holds: the rollout engine's CPUs and GPUs."""
    rc = cfg.rl.rollout
    return {"num_cpus": rc.cpus_per_engine, "num_gpus": rc.gpus_per_engine}


def reward_scores(
    rm_dir: str,
    prompts: list[list[dict]],
    answers: list[str],
    batch_size: int = 64,
    prompt_format: str = "auto",
    message_lists: int = 0,
    device: str | torch.device | None = None,
) -> list[float]:
    """Reward-model scores of (prompt, answer) pairs, tokenized as the RM's training rows, on
    `device` (None: `local_device()`, the process's GPU where it has one)."""
    from rlhf.data.render import tokenize_example
    from rlhf.models.factory import load_reward_model, local_device, sequence_rewards

    device = local_device(device)
    tok, fmt = load_tokenizer(rm_dir, prompt_format, message_lists)
    model = load_reward_model(rm_dir).to(device).eval()
    rows = [
        tokenize_example([*p, {"role": "assistant", "content": a}], tok, fmt)[0]
        for p, a in zip(prompts, answers)
    ]
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = [{"input_ids": ids} for ids in rows[i : i + batch_size]]
            enc = tok.pad(batch, padding=True, return_tensors="pt").to(device)
            rewards = sequence_rewards(model, enc["input_ids"], enc["attention_mask"])
            scores.extend(rewards.float().tolist())
    return scores


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of items where a beats b, ties counting half."""
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    return wins / max(1, len(a))


def mcnemar_p(a: list[bool], b: list[bool]) -> float:
    """Exact two-sided McNemar test of paired right/wrong outcomes: a binomial test on the items
    exactly one of the two got right (1.0 when there are none)."""
    from scipy.stats import binomtest

    fixed, broken = flips(a, b)
    if fixed + broken == 0:
        return 1.0
    return float(binomtest(fixed, fixed + broken, 0.5).pvalue)


def flips(before: list[bool], after: list[bool]) -> tuple[int, int]:
    """(items right only after, items right only before): questions fixed and broken."""
    return (
        sum(y and not x for x, y in zip(before, after)),
        sum(x and not y for x, y in zip(before, after)),
    )


def paired_p(a: list[float], b: list[float]) -> float:
    """Two-sided Wilcoxon signed-rank test of paired per-item scores (1.0 when all are equal)."""
    from scipy.stats import wilcoxon

    if all(x == y for x, y in zip(a, b)):
        return 1.0
    return float(wilcoxon(a, b).pvalue)


def load_scored_prompts(cfg: Config) -> tuple[list[list[dict]], list[str], int]:
    """Held-out chats and reference answers: sft.eval_files (read with sft.columns), then
    eval.prompt_files (eval.columns); and how many records were lists of turns."""
    from rlhf.data import DataError
    from rlhf.data.stages import load_eval_prompts, load_prompts

    prompts, labels, message_lists = [], [], 0
    if cfg.sft.eval_files:
        prompts, labels, report = load_eval_prompts(cfg.sft)
        message_lists += report["message_lists"]
    label_key = cfg.eval.columns.get("label", "label")
    for f in cfg.eval.prompt_files:
        items, report = load_prompts([f], columns=cfg.eval.columns)
        message_lists += report["message_lists"]
        for i, (turns, label) in enumerate(items):
            if label is None:
                raise DataError(
                    f"{f.path}: record {i + 1}: no {label_key!r}: eval.prompt_files need "
                    "the reference answer to score against"
                )
            prompts.append(turns)
            labels.append(label)
    n = cfg.eval.num_prompts
    return prompts[:n], labels[:n], message_lists


def evaluate_policies(
    cfg: Config,
    policies: dict[str, str],
    baseline: str,
    compare: list[str],
    rm_dir: str | None = None,
) -> dict[str, Any]:
    """Accuracy of every policy on the held-out prompts; each of `compare` against `baseline`.

    Per policy: greedy exact match (`eval/<name>_accuracy`) and, with eval.samples > 0, the mean
    exact match of sampled answers (`eval/<name>_sampled_accuracy`: the expected reward of the
    policy as RL samples it). Per compared pair: questions fixed and broken, win rates (exact
    match; reward-model scores with `rm_dir`), and paired p-values (exact McNemar on greedy
    answers, Wilcoxon signed-rank on per-question sampled accuracy).
    """
    prompts, labels, message_lists = load_scored_prompts(cfg)
    if not prompts:
        return {}
    ev = cfg.eval
    rendering = {"prompt_format": ev.prompt_format, "message_lists": message_lists}
    results: dict[str, Any] = {"eval/num_prompts": len(prompts)}
    answers, correct, sampled = {}, {}, {}
    got_all = policies_answers(
        policies,
        prompts,
        ev.max_new_tokens,
        ev.samples,
        ev.temperature,
        cfg.run.seed,
        **rendering,
        engine=ev.engine,
        resources=engine_resources(cfg),
    )
    for name, (greedy, got) in got_all.items():
        answers[name] = greedy
        correct[name] = [exact_match(a, y) for a, y in zip(answers[name], labels)]
        results[f"eval/{name}_accuracy"] = round(sum(correct[name]) / len(prompts), 4)
        if ev.samples > 0:
            sampled[name] = [
                sum(exact_match(a, y) for a in many) / ev.samples for many, y in zip(got, labels)
            ]
            results[f"eval/{name}_sampled_accuracy"] = round(sum(sampled[name]) / len(prompts), 4)
    baseline_rm: list[float] | None = None  # the reward model scores the baseline once
    for name in compare:
        if name not in answers or baseline not in answers:
            continue
        a, b = correct[baseline], correct[name]
        key = f"eval/{name}_vs_{baseline}"
        results[f"{key}_fixed"], results[f"{key}_broken"] = flips(a, b)
        results[f"{key}_greedy_p"] = round(mcnemar_p(a, b), 4)
        results[f"{key}_win_rate_exact"] = round(
            win_rate([float(x) for x in b], [float(x) for x in a]), 4
        )
        if sampled:
            results[f"{key}_sampled_p"] = float(f"{paired_p(sampled[baseline], sampled[name]):.3g}")
        if rm_dir:
            if baseline_rm is None:
                baseline_rm = reward_scores(rm_dir, prompts, answers[baseline], **rendering)
            mine = reward_scores(rm_dir, prompts, answers[name], **rendering)
            results[f"{key}_win_rate_rm"] = round(win_rate(mine, baseline_rm), 4)
    return results


def evaluate_pipeline(cfg: Config, base_dir: str, outputs: dict[str, str]) -> dict[str, Any]:
    """Every model the pipeline made (and the base), with DPO and RL compared to SFT."""
    policies = {"base": base_dir, **{k: v for k, v in outputs.items() if k != "rm"}}
    return evaluate_policies(cfg, policies, "sft", ["dpo", "rl"], outputs.get("rm"))
