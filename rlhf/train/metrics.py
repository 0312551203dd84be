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
    def __init__(self, stage_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.t0 = time.time()
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        stage_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(stage_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self.tb = SummaryWriter(str(stage_dir / "tensorboard"))

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

    def log_event(self, name: str, payload: Any) -> None:
        if self.enabled:
            self.jsonl.write(
                json.dumps({"event": name, "time": time.time(), "data": payload}) + "\n"
            )
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
