"""RLAIF: preference pairs from sampled answers, judged by an AI judge, a reward model or a rule.

    rlhf sample configs/tiny_cpu.yaml --model runs/tiny_cpu/sft/model \
        --prompts rlhf/data/samples/prompts.jsonl --k 4 --out runs/tiny_cpu/rlaif/answers.jsonl
    rlhf label configs/tiny_cpu.yaml --answers runs/tiny_cpu/rlaif/answers.jsonl \
        --prompts rlhf/data/samples/prompts.jsonl --judge model=runs/tiny_cpu/sft/model \
        --judge rule --out runs/tiny_cpu/rlaif/pairwise.jsonl
    rlhf run configs/tiny_cpu.yaml run.stages=[rm] \
        'rm.train_files=[{path: runs/tiny_cpu/rlaif/pairwise.jsonl}]'      # or [dpo], then rl

Every two different answers of a prompt make a pair; each judge gives a verdict per pair: +1 (the
first is better), -1 (the second), 0 (no preference). Judges (`--judge KIND[=VALUE]`):
- `model[=PATH]`: a causal LM (judge.model_path) reads the constitution (judge.constitution) and
  both answers, labelled A and B, and we read its next-token probabilities of the labels "A" and
  "B" (never free text). Each pair is asked in both orders; the judge prefers x to y only when
  P(A) > 1/2 with x as A and P(A) < 1/2 with y as A. Orders that disagree (the judge picks a
  position, not an answer: position bias) give no verdict and are counted.
  Scoring runs in-process with transformers (fp32, batched, left padding): fine for the tiny
  models on a CPU; a 1B+ judge wants the vLLM engines (not done).
- `reward_model[=PATH]`: the higher RM score wins when the gap exceeds judge.rm_margin.
- `rule[=NAME]`: a rule of rlhf/rl/rewards.py (judge.rule; exact_match) against each prompt's
  label; the higher score wins.
The first judge labels the output; with `--require-agreement` only pairs every judge decided the
same way are written. The output is the pairwise format ({prompt, chosen, rejected}) the RM and
DPO stages read; `<out>.report.json` holds counts, ties, order disagreements, agreement between
judges and, when every prompt has a label, each judge's agreement with the gold rule.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from rlhf.config import ConfigError
from rlhf.data.formats import FieldError, to_prompt
from rlhf.data.records import DataError, read_records

JUDGE_KINDS = ("model", "reward_model", "rule")
LABELS = ("A", "B")
JUDGE_TEMPLATE = """Judge two answers to a request by these principles:
{constitution}

Request: {question}
Answer A: {first}
Answer B: {second}
Which answer follows the principles better? Reply A or B."""
# Without a chat template the reply is cued in the text and the labels follow a space.
RAW_CUE = "\nBetter answer:"


@dataclass(frozen=True)
class Item:
    """One prompt of the answers file: its turns, the answers to judge, the gold label if any."""

    prompt: list[dict]
    answers: list[str]
    label: str | None
    raw_prompt: Any  # as the file had it (a string or a list of turns), written back as is


def question_text(prompt: list[dict]) -> str:
    """The request as the judge reads it: the user's text, or every turn as `role: content`."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{t['role']}: {t['content']}" for t in prompt)


def parse_judge(spec: str, jcfg: Any) -> tuple[str, str]:
    """`KIND[=VALUE]` -> (kind, value), the value defaulting to the judge.* config."""
    kind, _, value = spec.partition("=")
    if kind not in JUDGE_KINDS:
        raise ConfigError(
            f"--judge {spec!r}: unknown kind {kind!r} (expected one of {JUDGE_KINDS})"
        )
    default = {"model": jcfg.model_path, "reward_model": jcfg.reward_model_path, "rule": jcfg.rule}
    value = value or default[kind]
    if not value:
        key = "judge.model_path" if kind == "model" else "judge.reward_model_path"
        raise ConfigError(f"--judge {spec!r}: no checkpoint: give {kind}=PATH or set {key}")
    if kind != "rule" and not (Path(value) / "config.json").is_file():
        raise ConfigError(f"--judge {spec!r}: {value} is not a saved model (no config.json)")
    return kind, value


def read_answers(path: str, labels_file: str | None = None) -> list[Item]:
    """Prompts and answers as `rlhf sample` writes them ({prompt, responses: [{text, ...}],
    label?}); labels missing there are looked up by prompt in `labels_file` ({prompt, label})."""
    known: dict[str, str] = {}
    if labels_file:
        for rec in read_records(labels_file):
            if rec.data.get("label") is not None:
                known[json.dumps(rec.data.get("prompt"))] = rec.data["label"]
    items = []
    for rec in read_records(path):
        try:
            prompt, label = to_prompt(rec.data)
            responses = rec.data.get("responses")
            if not isinstance(responses, list) or len(responses) < 2:
                raise FieldError("responses", "expected a list of at least 2 {text}")
            answers = []
            for i, r in enumerate(responses):
                text = r.get("text") if isinstance(r, dict) else None
                if not isinstance(text, str):
                    raise FieldError(f"responses[{i}].text", "expected a string")
                answers.append(text)
        except FieldError as exc:
            raise DataError(f"{rec.where}: {exc.field}: {exc.problem}") from None
        label = label if label is not None else known.get(json.dumps(rec.data["prompt"]))
        items.append(Item(prompt, answers, label, rec.data["prompt"]))
    if not items:
        raise DataError(f"{path}: no records")
    return items


def answer_pairs(items: list[Item]) -> list[tuple[int, int, int]]:
    """(item, i, j) for every two answers of an item whose texts differ after stripping
    (the same text twice is no comparison); i < j."""
    pairs = []
    for n, item in enumerate(items):
        first_seen: dict[str, int] = {}
        for i, text in enumerate(item.answers):
            first_seen.setdefault(text.strip(), i)
        distinct = sorted(first_seen.values())
        pairs.extend((n, i, j) for i, j in combinations(distinct, 2))
    return pairs


def verdicts_from_scores(first: list[float], second: list[float], margin: float = 0.0) -> list[int]:
    """+1 where the first score beats the second by more than `margin`, -1 the reverse, else 0.
    e.g. first [1.0, 0.2, 0.5], second [0.0, 0.3, 0.5], margin 0.05 -> [1, -1, 0]."""
    return [1 if a - b > margin else -1 if b - a > margin else 0 for a, b in zip(first, second)]


def combine_orders(p_xy: list[float], p_yx: list[float]) -> tuple[list[int], list[bool]]:
    """Verdicts of x against y from P(A is better) asked both ways: with x as A (`p_xy`) and with
    y as A (`p_yx`). x wins when p_xy > 1/2 and p_yx < 1/2, y wins the reverse; both above (or
    both below) 1/2 is an order disagreement (the judge followed the position): verdict 0,
    flagged. e.g. p_xy [0.9, 0.2, 0.7], p_yx [0.3, 0.6, 0.8] -> ([1, -1, 0], [F, F, T])."""
    verdicts, disagree = [], []
    for a, b in zip(p_xy, p_yx):
        if a > 0.5 and b < 0.5:
            verdicts.append(1)
        elif a < 0.5 and b > 0.5:
            verdicts.append(-1)
        else:
            verdicts.append(0)
        disagree.append((a > 0.5 and b > 0.5) or (a < 0.5 and b < 0.5))
    return verdicts, disagree


def agreement(a: list[int], b: list[int]) -> dict[str, Any]:
    """Over pairs both judges decided (verdict != 0): how many, and the share decided alike.
    e.g. [1, -1, 0, 1] vs [1, 1, 1, 1] -> 2 decided by both, 1 alike -> 0.5."""
    both = [(x, y) for x, y in zip(a, b) if x and y]
    alike = sum(x == y for x, y in both)
    return {"decided_by_both": len(both), "agreement": alike / len(both) if both else None}


def _render(tok, text: str) -> str:
    if tok.chat_template:
        chat = [{"role": "user", "content": text}]
        return tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return text + RAW_CUE


def _label_query(tok, text: str, chat: bool) -> tuple[list[int], int, int]:
    """Context ids and the two label token ids: the first token where `text + A` and `text + B`
    tokenize differently (robust to tokenizers that merge a space into the label)."""
    sep = "" if chat else " "
    ids_a = tok(text + sep + LABELS[0], add_special_tokens=False)["input_ids"]
    ids_b = tok(text + sep + LABELS[1], add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(ids_a), len(ids_b)) and ids_a[n] == ids_b[n]:
        n += 1
    if n >= min(len(ids_a), len(ids_b)):
        raise ConfigError("judge: the labels A and B tokenize alike; this tokenizer cannot judge")
    return ids_a[:n], ids_a[n], ids_b[n]


def ai_first_probs(
    model_dir: str,
    queries: list[tuple[str, str, str]],
    constitution: str,
    batch_size: int = 8,
    max_length: int = 2048,
    device: str | torch.device | None = None,
) -> list[float]:
    """P(A is better) for each (question, answer A, answer B): the judge's next-token
    probabilities of the two labels, renormalised over the two; the judge runs on `device`
    (None: `local_device()`, the process's GPU where it has one)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlhf.models.factory import local_device

    device = local_device(device)

    tok = AutoTokenizer.from_pretrained(model_dir)
    context = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    limit = min(max_length, context or max_length)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    chat = bool(tok.chat_template)
    rows = []
    for n, (q, a, b) in enumerate(queries):
        text = _render(
            tok, JUDGE_TEMPLATE.format(constitution=constitution, question=q, first=a, second=b)
        )
        ids, ta, tb = _label_query(tok, text, chat)
        if len(ids) > limit:
            raise DataError(
                f"judge prompt {n + 1} has {len(ids)} tokens, more than {limit} (judge.max_length"
                f"={max_length}, the judge's context {context}): shorten the constitution or "
                "the answers, or use a judge with a longer context"
            )
        rows.append((ids, ta, tb))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    probs: list[float] = []
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            enc = tok.pad([{"input_ids": r[0]} for r in chunk], padding=True, return_tensors="pt")
            enc = enc.to(device)
            mask = enc["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens from 0
            logits = model(enc["input_ids"], attention_mask=mask, position_ids=positions).logits
            last = logits[:, -1].float()
            pair = torch.stack([last[i, [r[1], r[2]]] for i, r in enumerate(chunk)])
            probs.extend(torch.softmax(pair, dim=-1)[:, 0].tolist())
    return probs


def judge_pairs(
    kind: str,
    value: str,
    jcfg: Any,
    prompts: list[list[dict]],
    firsts: list[str],
    seconds: list[str],
    labels: list[str | None],
) -> dict[str, Any]:
    """One judge's verdicts on (prompt, first, second) triples: {"verdicts": [+1/-1/0], ...};
    the AI judge adds `order_disagreements` (a flag per pair) and `p_first` (P(first better),
    averaged over the two orders)."""
    if kind == "rule":
        from rlhf.rl.rewards import load_rule, rule_rewards

        rule = load_rule(value)
        texts = [question_text(p) for p in prompts]
        a = rule_rewards(rule, texts, firsts, labels)
        b = rule_rewards(rule, texts, seconds, labels)
        return {"verdicts": verdicts_from_scores(a, b), "scores": (a, b)}
    if kind == "reward_model":
        from rlhf.evaluate import reward_scores

        a = reward_scores(value, prompts, firsts)
        b = reward_scores(value, prompts, seconds)
        return {"verdicts": verdicts_from_scores(a, b, jcfg.rm_margin), "scores": (a, b)}
    constitution = _read_text(jcfg.constitution)
    texts = [question_text(p) for p in prompts]
    queries = list(zip(texts, firsts, seconds)) + list(zip(texts, seconds, firsts))
    probs = ai_first_probs(value, queries, constitution, jcfg.batch_size, jcfg.max_length)
    p_xy, p_yx = probs[: len(texts)], probs[len(texts) :]
    verdicts, disagree = combine_orders(p_xy, p_yx)
    return {
        "verdicts": verdicts,
        "order_disagreements": disagree,
        "p_first": [(x + 1 - y) / 2 for x, y in zip(p_xy, p_yx)],
    }


def _read_text(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"judge.constitution = {path!r}: cannot read it ({exc})") from None
    if not text:
        raise ConfigError(f"judge.constitution = {path!r}: the file is empty")
    return text


def _judge_summary(result: dict[str, Any]) -> dict[str, Any]:
    v = result["verdicts"]
    out = {"pairs": len(v), "first_better": v.count(1), "second_better": v.count(-1)}
    out["no_preference"] = v.count(0)
    if "order_disagreements" in result:
        out["order_disagreements"] = sum(result["order_disagreements"])
        out["ties"] = out["no_preference"] - out["order_disagreements"]
    else:
        out["ties"] = out["no_preference"]
    return out


def _agreements(jcfg, results: dict, prompts, firsts, seconds, labels) -> dict[str, Any]:
    """Agreement of every two judges and, when every pair has a label, of each with the gold
    rule (judge.rule)."""
    out: dict[str, Any] = {}
    if len(results) > 1:
        out["agreement"] = {
            f"{a} vs {b}": agreement(results[a]["verdicts"], results[b]["verdicts"])
            for a, b in combinations(results, 2)
        }
    if prompts and None not in labels:
        gold = judge_pairs("rule", jcfg.rule, jcfg, prompts, firsts, seconds, labels)
        out["gold_rule"] = jcfg.rule
        out["agreement_with_gold"] = {
            name: agreement(r["verdicts"], gold["verdicts"]) for name, r in results.items()
        }
    return out


def label_answers(
    cfg: Any,
    answers_file: str,
    out: str,
    judges: list[str],
    labels_file: str | None = None,
    require_agreement: bool = False,
) -> dict[str, Any]:
    """Judge every pair of answers, write `out` (pairwise records) and `<out>.report.json`."""
    if not judges:
        raise ConfigError("--judge: give at least one judge (model, reward_model or rule)")
    specs = [parse_judge(s, cfg.judge) for s in judges]
    names = [f"{k}={v}" for k, v in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"--judge: a judge is given twice: {names}")
    items = read_answers(answers_file, labels_file)
    pairs = answer_pairs(items)
    prompts = [items[n].prompt for n, _, _ in pairs]
    firsts = [items[n].answers[i] for n, i, _ in pairs]
    seconds = [items[n].answers[j] for n, _, j in pairs]
    labels = [items[n].label for n, _, _ in pairs]
    if any(k == "rule" for k, _ in specs) and None in labels:
        missing = next(n for n, it in enumerate(items) if it.label is None)
        raise DataError(
            f"{answers_file}: record {missing + 1}: no label, and the rule judge needs one "
            "(add `label` or pass --prompts with the labels)"
        )
    results = {
        name: judge_pairs(k, v, cfg.judge, prompts, firsts, seconds, labels)
        for name, (k, v) in zip(names, specs)
    }
    report: dict[str, Any] = {
        "prompts": len(items),
        "answers": sum(len(it.answers) for it in items),
        "pairs": len(pairs),
        "labelled_by": names[0],
        "judges": {name: _judge_summary(r) for name, r in results.items()},
    }
    report.update(_agreements(cfg.judge, results, prompts, firsts, seconds, labels))
    chosen = results[names[0]]["verdicts"]
    if require_agreement:
        chosen = [
            v if all(r["verdicts"][i] == v for r in results.values()) else 0
            for i, v in enumerate(chosen)
        ]
    records = []
    for (n, _, _), v, a, b in zip(pairs, chosen, firsts, seconds):
        if v:
            better, worse = (a, b) if v > 0 else (b, a)
            records.append({"prompt": items[n].raw_prompt, "chosen": better, "rejected": worse})
    report["written_pairs"] = len(records)
    report["require_agreement"] = require_agreement
    _write_jsonl(Path(out), records)
    report_path = Path(f"{out}.report.json")
    report_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    report["out"], report["report"] = out, str(report_path)
    return report


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
