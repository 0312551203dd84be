"""The training core's abort rule, shared by the offline stages and the RL updates."""

import pytest

from rlhf.train.core import NonFiniteError, nonfinite_streak


def test_a_finite_step_resets_the_streak_and_the_limit_th_skip_in_a_row_aborts():
    streak = 0
    for skipped in (True, True, False, True, True):  # never 3 in a row
        streak = nonfinite_streak(streak, skipped, 3, "lower sft.lr")
    assert streak == 2
    with pytest.raises(
        NonFiniteError, match="3 steps in a row had a non-finite loss or gradient; lower sft.lr"
    ):
        nonfinite_streak(streak, True, 3, "lower sft.lr")
