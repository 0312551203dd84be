"""Feedback in the database -> the pairwise and ranked files the reward-model and DPO stages read.

    rlhf feedback export configs/tiny_cpu.yaml --out runs/tiny_cpu/feedback   # [--db URL]
    # then: rlhf run configs/tiny_cpu.yaml run.stages=[rm] \
    #     'rm.train_files=[{path: runs/tiny_cpu/feedback/pairwise.jsonl}]'

Writes `pairwise.jsonl` ({prompt, chosen, rejected}), `ranked.jsonl` ({prompt, responses: [{text,
rank}]}) and `report.json`. What becomes what:
- comparison: one pair (chosen > rejected);
- ranking: one ranked list (the RM stage expands it into all C(K,2) pairs);
- correction: one pair (corrected text > the served answer);
- ratings: each answer's mean rating over its raters; two answers of one prompt whose means differ
  make one pair (higher > lower).
Every judgement is written as given: a pair judged 2:1 contributes both directions, which is what
a Bradley-Terry reward model should see. The report counts feedback per kind, what was written and
skipped (and why), conflicts (one pair of answers judged both ways by comparisons or rankings) and
agreement where several raters judged one pair: the share of same-pair judgement pairs from
different raters that agree. Only chat answers are exported: a /v1/completions prompt is raw text,
not the chat turns the preference stages train on.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

from rlhf.serve.protocol import Feedback


def _pairs_from_ratings(ratings: dict[str, list[int]], by_id: dict[str, dict]) -> list[tuple]:
    """(better id, worse id) for answers of one prompt whose mean ratings differ."""
    by_prompt: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for rid, values in ratings.items():
        by_prompt[by_id[rid]["prompt_key"]].append((sum(values) / len(values), rid))
    pairs = []
    for rated in by_prompt.values():
        for (ma, a), (mb, b) in combinations(sorted(rated, reverse=True), 2):
            if ma != mb:
                pairs.append((a, b))
    return pairs


def agreement_stats(judgements: list[tuple[str, str, str]]) -> dict[str, Any]:
    """Conflicts and inter-rater agreement over (better id, worse id, rater) judgements.

    Agreement: over every two judgements of the same pair by different raters, the share that
    agree (e.g. a pair judged a>b, a>b, b>a by three raters: 1 agreeing couple of 3 -> 1/3).
    """
    by_pair: dict[frozenset, list[tuple[str, str]]] = defaultdict(list)
    for better, worse, rater in judgements:
        by_pair[frozenset((better, worse))].append((better, rater))
    conflicts, agree, couples, several = 0, 0, 0, 0
    for votes in by_pair.values():
        conflicts += len({winner for winner, _ in votes}) > 1
        if len({rater for _, rater in votes}) > 1:
            several += 1
        for (wa, ra), (wb, rb) in combinations(votes, 2):
            if ra != rb:
                couples += 1
                agree += wa == wb
    return {
        "judged_pairs": len(by_pair),
        "conflicting_pairs": conflicts,
        "pairs_judged_by_several_raters": several,
        "rater_agreement": agree / couples if couples else None,
    }


def build_preferences(
    responses: list[dict], feedback: list[Feedback]
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(pairwise records, ranked records, report) from the logged answers and the feedback."""
    by_id = {r["id"]: r for r in responses}
    kinds, skipped, written = Counter(), Counter(), Counter()
    pairs: list[tuple[str, Any, str, str]] = []  # (source, prompt, chosen text, rejected text)
    ranked, judgements = [], []
    ratings: dict[str, list[int]] = defaultdict(list)
    raters_per_prompt: dict[str, set] = defaultdict(set)
    for fb in feedback:
        kinds[fb.kind] += 1
        rows = [by_id[rid] for rid in fb.response_ids]
        if rows[0]["endpoint"] != "chat":
            skipped["completion_prompt"] += 1
            continue
        rater = fb.rater or f"anonymous:{fb.id}"
        raters_per_prompt[rows[0]["prompt_key"]].add(rater)
        prompt = rows[0]["prompt"]
        if fb.kind == "comparison":
            pairs.append(("comparison", prompt, rows[0]["answer"], rows[1]["answer"]))
            judgements.append((rows[0]["id"], rows[1]["id"], rater))
        elif fb.kind == "ranking":
            texts = [{"text": r["answer"], "rank": i + 1} for i, r in enumerate(rows)]
            ranked.append({"prompt": prompt, "responses": texts})
            judgements += [(a["id"], b["id"], rater) for a, b in combinations(rows, 2)]
        elif fb.kind == "correction":
            pairs.append(("correction", prompt, fb.text, rows[0]["answer"]))
        else:
            ratings[rows[0]["id"]].append(fb.rating)
    for better, worse in _pairs_from_ratings(ratings, by_id):
        pairs.append(
            ("rating", by_id[better]["prompt"], by_id[better]["answer"], by_id[worse]["answer"])
        )
    pairwise = []
    for source, prompt, chosen, rejected in pairs:
        if not chosen.strip() or not rejected.strip():
            skipped[f"{source}: empty answer"] += 1
        elif chosen == rejected:
            skipped[f"{source}: chosen and rejected are the same text"] += 1
        else:
            pairwise.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            written[f"pairs_from_{source}"] += 1
    for record in ranked:
        if any(not r["text"].strip() for r in record["responses"]):
            skipped["ranking: empty answer"] += 1
    ranked = [r for r in ranked if all(x["text"].strip() for x in r["responses"])]
    report = {
        "responses": len(responses),
        "feedback": dict(kinds),
        "written": {"pairwise": len(pairwise), "ranked": len(ranked), **written},
        "skipped": dict(skipped),
        "prompts_judged_by_several_raters": sum(len(r) > 1 for r in raters_per_prompt.values()),
        **agreement_stats(judgements),
    }
    return pairwise, ranked, report


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def export_feedback(database_url: str, out_dir: str | Path) -> dict[str, Any]:
    """Read the database, write pairwise.jsonl, ranked.jsonl and report.json; return the report."""
    from rlhf.serve.db import FeedbackStore

    store = FeedbackStore(database_url)
    store.create_tables()  # an empty database exports empty files, not an error
    pairwise, ranked, report = build_preferences(store.all_responses(), store.all_feedback())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "pairwise.jsonl", pairwise)
    _write_jsonl(out / "ranked.jsonl", ranked)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
