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

from rlhf.config import Config


def exact_match(answer: str, label: str) -> bool:
    return answer.strip() == label.strip()


def _tokenizer(model_dir: str, prompt_format: str, message_lists: int) -> tuple[Any, str]:
    """The model's tokenizer and the prompt format resolved for it (`raw` or `chat`)."""
    from transformers import AutoTokenizer

    from rlhf.data.render import resolve_prompt_format

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, resolve_prompt_format(prompt_format, tok, message_lists, "eval.prompt_format")


def encode_prompts(
    model_dir: str, prompts: list[list[dict]], prompt_format: str = "auto", message_lists: int = 0
) -> tuple[Any, list[list[int]]]:
    """The model's tokenizer and the prompts' token ids, rendered as SFT and RL render them."""
    from rlhf.data.render import render_prompt

    tok, fmt = _tokenizer(model_dir, prompt_format, message_lists)
    return tok, [render_prompt(p, tok, fmt) for p in prompts]


def policy_answers(
    model_dir: str,
    prompts: list[list[dict]],
    max_new_tokens: int,
    num_samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    prompt_format: str = "auto",
    message_lists: int = 0,
    engine: str = "transformers",
    resources: dict[str, float] | None = None,
) -> tuple[list[str], list[list[str]]]:
    """Greedy answers to prompts (lists of turns, rendered by `prompt_format`) and `num_samples`
    sampled ones each, stopping at EOS: (greedy, sampled). `message_lists`: how many prompts came
    as lists of turns (for `auto`). `engine="vllm"`: a vLLM engine (`engine_tokens`), else
    transformers in this process (left padding, the model loaded once)."""
    tok, rendered = encode_prompts(model_dir, prompts, prompt_format, message_lists)
    if engine == "vllm":
        greedy_ids, sampled_ids = engine_tokens(
            model_dir, rendered, max_new_tokens, num_samples, temperature, seed, resources
        )
        decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        return [decode(x) for x in greedy_ids], [[decode(x) for x in xs] for xs in sampled_ids]
    from transformers import AutoModelForCausalLM

    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(**sampling) -> list[str]:
        out: list[str] = []
        for i in range(0, len(rendered), batch_size):
            batch = [{"input_ids": ids} for ids in rendered[i : i + batch_size]]
            enc = tok.pad(batch, padding=True, return_tensors="pt")
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                **sampling,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            out.extend(
                tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            )
        return out

    sampled: list[list[str]] = []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        greedy = generate(do_sample=False)
        if num_samples > 0:
            torch.manual_seed(seed)
            flat = generate(
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                num_return_sequences=num_samples,
            )
            sampled = [flat[j : j + num_samples] for j in range(0, len(flat), num_samples)]
    return greedy, sampled


def _vllm_tokens(
    model_dir: str,
    rendered: list[list[int]],
    max_new_tokens: int,
    num_samples: int,
    temperature: float,
    seed: int,
) -> tuple[list[list[int]], list[list[list[int]]]]:
    from actors.rollout import RolloutEngine

    engine = RolloutEngine(
        model_dir,
        max_model_len=max(map(len, rendered)) + max_new_tokens,
        max_num_seqs=64,
        seed=seed,
    )
    try:
        out = engine.generate(rendered, max_tokens=max_new_tokens, temperature=0.0)
        greedy = [s.token_ids for s in out]
        sampled: list[list[list[int]]] = []
        if num_samples > 0:
            flat = engine.generate(
                rendered,
                n=num_samples,
                max_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
            )
            ids = [s.token_ids for s in flat]
            sampled = [ids[j : j + num_samples] for j in range(0, len(ids), num_samples)]
    finally:
        engine.shutdown()
    return greedy, sampled


def engine_tokens(
    model_dir: str,
    rendered: list[list[int]],
    max_new_tokens: int,
    num_samples: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    resources: dict[str, float] | None = None,
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Greedy and sampled answer token ids from a vLLM engine built from `model_dir`: in a Ray
    task holding `resources` ({"num_cpus", "num_gpus"}: the rollout engine's) when Ray runs in
    this process, so a driver without a GPU evaluates on the cluster's; else in this process."""
    import ray

    if ray.is_initialized():
        task = ray.remote(_vllm_tokens).options(**(resources or {"num_cpus": 1}))
        return ray.get(
            task.remote(model_dir, rendered, max_new_tokens, num_samples, temperature, seed)
        )
    return _vllm_tokens(model_dir, rendered, max_new_tokens, num_samples, temperature, seed)


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
) -> list[float]:
    """Reward-model scores of (prompt, answer) pairs, tokenized as the RM's training rows."""
    from rlhf.data.render import tokenize_example
    from rlhf.models.factory import load_reward_model, sequence_rewards

    tok, fmt = _tokenizer(rm_dir, prompt_format, message_lists)
    model = load_reward_model(rm_dir).eval()
    rows = [
        tokenize_example([*p, {"role": "assistant", "content": a}], tok, fmt)[0]
        for p, a in zip(prompts, answers)
    ]
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = [{"input_ids": ids} for ids in rows[i : i + batch_size]]
            enc = tok.pad(batch, padding=True, return_tensors="pt")
            scores.extend(sequence_rewards(model, enc["input_ids"], enc["attention_mask"]).tolist())
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
    for name, path in policies.items():
        answers[name], got = policy_answers(
            path,
            prompts,
            ev.max_new_tokens,
            ev.samples,
            ev.temperature,
            cfg.run.seed,
            **rendering,
            engine=ev.engine,
            resources=engine_resources(cfg),
        )
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
