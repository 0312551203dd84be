"""The human ranking workflow: K answers per prompt from a policy, into a ranked-list file to fill in.

    rlhf sample configs/tiny_cpu.yaml --model runs/tiny_cpu/sft/model \
        --prompts prompts.jsonl --k 4 --out to_rank.jsonl
    # people replace each "rank": null by 1..K (1 = best); then the file is RM / DPO data:
    rlhf run configs/tiny_cpu.yaml run.stages=[rm] 'rm.train_files=[{path: to_rank.jsonl}]'

Prompts are read like RL prompts ({prompt, label?} records, strictly validated); answers come from
the vLLM rollout engine (`serve.max_tokens`, `serve.temperature`, seeded by `run.seed`). Each output
line is {"prompt": ..., "responses": [{"text": ..., "rank": null}, ...]}; the reward-model stage
refuses a file whose ranks are not filled in (`responses[0].rank: expected an integer, got None`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rlhf.data.records import DataError


def sample_for_ranking(cfg, model_path: str, prompts_file: str, k: int, out: str) -> dict[str, Any]:
    """Write `out` (one ranked list to fill in per prompt); return counts."""
    from transformers import AutoTokenizer

    from actors.rollout import RolloutEngine
    from rlhf.config import DataFile
    from rlhf.data.stages import load_prompts

    if k < 2:
        raise DataError(f"--k {k}: a ranking needs at least 2 answers per prompt")
    items, _ = load_prompts([DataFile(path=prompts_file)])
    chats = [chat for chat, _ in items]
    from rlhf.data.render import render_prompt, resolve_prompt_format

    tok = AutoTokenizer.from_pretrained(model_path)
    # Rendered as the reward model's data will be (rm.prompt_format), like SFT, RL and eval.
    fmt = resolve_prompt_format(cfg.rm.prompt_format, tok, 0, "rm.prompt_format")
    ids = [render_prompt(chat, tok, fmt) for chat in chats]
    s = cfg.serve
    for i, prompt_ids in enumerate(ids):
        if len(prompt_ids) + s.max_tokens > s.max_model_len:
            raise DataError(
                f"{prompts_file}: record {i + 1}: {len(prompt_ids)} prompt tokens + "
                f"serve.max_tokens={s.max_tokens} exceed serve.max_model_len={s.max_model_len}"
            )
    engine = RolloutEngine(
        model_path,
        max_model_len=s.max_model_len,
        kv_cache_gb=s.kv_cache_gb,
        max_num_seqs=max(8, k * 4),
        seed=cfg.run.seed,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    try:
        samples = engine.generate(
            ids, n=k, max_tokens=s.max_tokens, temperature=s.temperature, seed=cfg.run.seed
        )
    finally:
        engine.shutdown()
    texts = [tok.decode(x.token_ids, skip_special_tokens=True) for x in samples]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    distinct = 0
    with open(path, "w", encoding="utf-8") as fh:
        for i, chat in enumerate(chats):
            answers = texts[i * k : (i + 1) * k]
            distinct += len(set(answers))
            prompt = chat[0]["content"] if len(chat) == 1 else chat
            record = {"prompt": prompt, "responses": [{"text": t, "rank": None} for t in answers]}
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return {
        "prompts": len(chats),
        "answers": len(texts),
        "distinct_answers_per_prompt": distinct / max(1, len(chats)),
        "out": str(path),
    }
