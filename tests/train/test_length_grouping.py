"""An offline step puts rows of similar length in the same micro-batch (each micro-batch is padded
to its longest row), and the step's update does not depend on that split."""

import dataclasses
from types import SimpleNamespace

import torch
from test_torch_engine import SETTINGS, SIZE

from rlhf import engine as eng
from rlhf.models.factory import build_tiny_model
from rlhf.train.loop import _train_step, stream_indices
from rlhf.train.tasks import TASKS

GLOBAL = 16


def _rows(count: int = 64) -> list[dict]:
    """SFT rows of 6-60 tokens whose first half is prompt (label -100)."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        length = int(torch.randint(6, 61, (1,), generator=gen))
        ids = torch.randint(3, 200, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2 :]})
    return rows


def _step(rows: list[dict], micro: int, widths: list[int]) -> dict[str, torch.Tensor]:
    """The weights after one SFT step on the first global batch of `rows`, in micro-batches of
    `micro` rows; `widths` receives each micro-batch's padded width."""
    sft = TASKS["sft"](None)

    def collate(batch_rows):
        batch = sft.collate(batch_rows)
        widths.append(batch["input_ids"].shape[1])
        return batch

    task = dataclasses.replace(sft, collate=collate)
    model = build_tiny_model(seed=0, **SIZE)
    engine = eng.init_engine(
        model,
        **{**SETTINGS, "micro_batch_size": micro, "grad_accum_steps": GLOBAL // micro},
        backend="torch",
    )
    scfg = SimpleNamespace(
        micro_batch_size=micro, grad_accum_steps=GLOBAL // micro, global_batch_size=GLOBAL
    )
    _train_step(task, engine, SimpleNamespace(train=rows), scfg, 0, 0, 0, 1)
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def test_micro_batches_hold_rows_of_similar_length_and_the_update_is_the_unsplit_ones():
    rows = _rows()
    split_widths, whole_widths = [], []
    split = _step(rows, micro=4, widths=split_widths)
    whole = _step(rows, micro=GLOBAL, widths=whole_widths)
    for name in whole:
        # Adam moves every weight by ~lr (1e-2) in its first step; sums in another order agree
        # to float rounding, which Adam amplifies where a gradient is near 0.
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-5)
    # The step's rows in stream order, cut into the same micro-batches, would pad far more.
    stream = [rows[i] for i in stream_indices(0, GLOBAL, len(rows), 0)]
    unsorted = [max(len(r["input_ids"]) for r in stream[i : i + 4]) for i in range(0, GLOBAL, 4)]
    assert split_widths == sorted(split_widths)
    assert sum(split_widths) < 0.8 * sum(unsorted), (split_widths, unsorted)
    assert whole_widths == [max(len(r["input_ids"]) for r in stream)]
