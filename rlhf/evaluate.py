"""Held-out evaluation of the pipeline's policies: task accuracy, win rates, reward-model scores.

    results = evaluate_pipeline(cfg, base_dir, {"sft": ".../sft/model", "dpo": ".../dpo/model"})

Every policy answers the held-out SFT prompts (`sft.eval_files`) greedily; an answer is correct
when it equals the reference answer after stripping whitespace (the demo task's exact-match rule).
DPO and RL policies are compared with SFT on the same prompts: a win when only the aligned policy is correct, a tie when both or
neither are, so win rate = (wins + ties / 2) / prompts; when a reward model was trained it also
judges the pair of answers.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf.config import Config


def exact_match(answer: str, label: str) -> bool:
    return answer.strip() == label.strip()


def greedy_answers(model_dir: str, prompts: list[list[dict]], max_new_tokens: int,
                   batch_size: int = 64) -> list[str]:
    """Greedy continuations of chat prompts with transformers (left padding, stop at EOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    answers: list[str] = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            answers.extend(tok.batch_decode(new, skip_special_tokens=True))
    return answers


def reward_scores(rm_dir: str, prompts: list[list[dict]], answers: list[str],
                  batch_size: int = 64) -> list[float]:
    from transformers import AutoTokenizer

    from rlhf.models.factory import load_reward_model, sequence_rewards

    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = load_reward_model(rm_dir).eval()
    texts = [tok.apply_chat_template([*p, {"role": "assistant", "content": a}], tokenize=False)
             for p, a in zip(prompts, answers)]
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            scores.extend(sequence_rewards(model, enc["input_ids"], enc["attention_mask"]).tolist())
    return scores


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of items where a beats b, ties counting half."""
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    return wins / max(1, len(a))


def evaluate_pipeline(cfg: Config, base_dir: str, outputs: dict[str, str]) -> dict[str, Any]:
    from rlhf.data.stages import load_eval_prompts

    if not cfg.sft.eval_files:
        return {}
    prompts, labels = load_eval_prompts(cfg.sft)
    prompts, labels = prompts[: cfg.eval.num_prompts], labels[: cfg.eval.num_prompts]
    results: dict[str, Any] = {"eval/num_prompts": len(prompts)}
    policies = {"base": base_dir, **{k: v for k, v in outputs.items() if k != "rm"}}
    answers, correct = {}, {}
    for name, path in policies.items():
        answers[name] = greedy_answers(path, prompts, cfg.eval.max_new_tokens)
        correct[name] = [float(exact_match(a, y)) for a, y in zip(answers[name], labels)]
        results[f"eval/{name}_accuracy"] = round(sum(correct[name]) / max(1, len(prompts)), 4)
    for name in ("dpo", "rl"):
        if name not in answers or "sft" not in answers:
            continue
        results[f"eval/{name}_vs_sft_win_rate_exact"] = round(
            win_rate(correct[name], correct["sft"]), 4)
        if "rm" in outputs:
            mine = reward_scores(outputs["rm"], prompts, answers[name])
            theirs = reward_scores(outputs["rm"], prompts, answers["sft"])
            results[f"eval/{name}_vs_sft_win_rate_rm"] = round(win_rate(mine, theirs), 4)
    return results
