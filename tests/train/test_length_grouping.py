"""An offline step puts rows of similar length in the same micro-batch (each micro-batch is padded
to its longest row), and the step's update does not depend on that split."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from test_torch_engine import SETTINGS, SIZE

from rlhf import engine as eng
from rlhf.models.factory import build_tiny_model
from rlhf.train.loop import _train_step, stream_indices, token_budget_batches
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


def _step(
    rows: list[dict], micro: int, widths: list[int], tokens: int | None = None, steps: int = 1
) -> dict[str, torch.Tensor]:
    """The weights after `steps` SFT steps on the first global batches of `rows`, in micro-batches
    of `micro` rows (or of at most `tokens` padded tokens); `widths` receives each micro-batch's
    padded (rows, width)."""
    sft = TASKS["sft"](None)

    def collate(batch_rows):
        batch = sft.collate(batch_rows)
        widths.append(tuple(batch["input_ids"].shape))
        return batch

    task = dataclasses.replace(sft, collate=collate)
    model = build_tiny_model(seed=0, **SIZE)
    engine = eng.init_engine(
        model,
        **{**SETTINGS, "micro_batch_size": micro, "grad_accum_steps": GLOBAL // micro},
        backend="torch",
    )
    scfg = SimpleNamespace(
        micro_batch_size=micro,
        grad_accum_steps=GLOBAL // micro,
        global_batch_size=GLOBAL,
        micro_batch_tokens=tokens,
    )
    for step in range(steps):
        _train_step(task, engine, SimpleNamespace(train=rows), scfg, 0, step, 0, 1)
    assert engine.global_steps == steps  # one optimizer step per global batch
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
    split_widths = [width for _, width in split_widths]
    assert split_widths == sorted(split_widths)
    assert sum(split_widths) < 0.8 * sum(unsorted), (split_widths, unsorted)
    assert whole_widths == [(GLOBAL, max(len(r["input_ids"]) for r in stream))]


def test_micro_batches_cut_by_a_token_budget_make_the_unsplit_update_with_less_padding():
    rows = _rows()
    cut, whole = [], []
    budgeted = _step(rows, micro=GLOBAL, widths=cut, tokens=96, steps=2)
    unsplit = _step(rows, micro=GLOBAL, widths=whole, steps=2)
    for name in unsplit:
        torch.testing.assert_close(budgeted[name], unsplit[name], rtol=1e-4, atol=1e-5)
    # Each micro-batch within the budget (a longer row alone), and the two steps cut differently.
    assert all(n * w <= 96 or n == 1 for n, w in cut), cut
    assert sum(n for n, _ in cut) == 2 * GLOBAL and len(cut) > 4
    assert sum(n * w for n, w in cut) < 0.7 * sum(n * w for n, w in whole), (cut, whole)


def test_token_budget_batches_fill_each_batch_up_to_the_budget_in_order():
    rows = [3, 3, 4, 5, 9, 20, 40]
    assert token_budget_batches(rows, int, 12) == [[3, 3, 4], [5], [9], [20], [40]]
    assert token_budget_batches(rows, int, 20) == [[3, 3, 4, 5], [9], [20], [40]]
    assert token_budget_batches(rows[:4], int, 100) == [rows[:4]]
    assert token_budget_batches([], int, 10) == []


def test_a_token_budget_with_deepspeed_is_refused_naming_the_key(tmp_path):
    from rlhf.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"micro_batch_tokens=512 needs the torch engine"):
        load_config(None, ["run.stages=[]", "sft.num_workers=2", "sft.micro_batch_tokens=512"])
    cfg = load_config(None, ["run.stages=[]", "sft.num_workers=1", "sft.micro_batch_tokens=512"])
    assert cfg.sft.micro_batch_tokens == 512 and cfg.sft.engine_backend == "torch"
