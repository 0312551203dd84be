"""Metrics of a stage: one JSONL line per log step, TensorBoard scalars, and a progress line.

Only rank 0 writes (`enabled=False` elsewhere), under `<stage_dir>/metrics.jsonl` and
`<stage_dir>/tensorboard/`. Names are namespaced and final (`sft/loss`, `sft/eval_loss`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


class MetricsWriter:
    """`resume_step`: None appends to what is there; a step s first drops every line logged
    after step s (a resumed run re-does those steps) and TensorBoard's events from step s + 1
    on, so each step is logged once; -1 starts both afresh."""

    def __init__(self, stage_dir: Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.t0 = time.time()
        self.stage_dir = stage_dir
        if not enabled:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        self._open(resume_step)

    def _open(self, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        path = self.stage_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
                try:
                    record = json.loads(line)
                    step = record.get("step", record.get("at_step", -1))
                except json.JSONDecodeError:  # a line cut short by a kill
                    break
                if resume_step < 0 or step > resume_step:
                    break
                kept.append(line)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(path)
        self.jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
        purge = None if resume_step is None else resume_step + 1
        self.tb = SummaryWriter(str(self.stage_dir / "tensorboard"), purge_step=purge)

    def rewind(self, step: int) -> None:
        """Continue as if only steps up to `step` had been logged (a restore from a checkpoint
        in the same process)."""
        if self.enabled:
            self.close()
            self._open(step)

    def log(self, step: int, metrics: dict[str, float], total: int | None = None) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **_finite(clean)}) + "\n")
        self.jsonl.flush()
        for k, v in clean.items():
            if math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        # Not print(): inside a Ray Train worker print is patched to also log the line, and the
        # driver would show it twice (once from the worker's stdout, once from its stderr).
        sys.stdout.write(progress_line(step, total, clean, time.time() - self.t0) + "\n")
        sys.stdout.flush()

    def log_event(self, name: str, payload: Any, at_step: int | None = None) -> None:
        """An event line; `at_step` ties it to a step, so a resume before that step drops it."""
        if self.enabled:
            line = {"event": name, "time": time.time(), "data": payload}
            if at_step is not None:
                line["at_step"] = at_step
            self.jsonl.write(json.dumps(line) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _finite(metrics: dict[str, float]) -> dict[str, float | str]:
    """JSON has no NaN: non-finite values are written as strings ("nan", "inf")."""
    return {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}


def progress_line(step: int, total: int | None, metrics: dict[str, float], elapsed: float) -> str:
    shown = [k for k in metrics if not k.endswith(("/lr", "/skipped_steps"))][:6]
    parts = [f"{k}={metrics[k]:.4g}" for k in shown]
    if total:
        eta = elapsed / max(step, 1) * (total - step)
        head = f"[{step}/{total} {100 * step / total:3.0f}% {elapsed:.0f}s eta {eta:.0f}s]"
    else:
        head = f"[{step}]"
    return head + " " + " ".join(parts)
