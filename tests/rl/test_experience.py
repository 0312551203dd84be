"""Experience batches: padding layout, logprob alignment under left padding, advantage phase."""

import pytest
import torch

from rlhf.algorithms import token_logprobs
from rlhf.models.factory import load_causal_lm
from rlhf.rl.experience import (
    Experience,
    build_batch,
    compute_advantages,
    concat_rows,
    groups_with_signal,
    minibatches,
    rank_bounds,
    response_logits,
    response_tokens,
)


def test_build_batch_layout():
    b = build_batch(
        [[7, 8, 9], [5]], [[10, 11], [12, 13, 14]], [[-0.5, -0.25], [-1, -2, -3]], pad_id=0
    )
    # Prompts end at column 3 for every row; responses start there.
    assert b.input_ids.tolist() == [[7, 8, 9, 10, 11, 0], [0, 0, 5, 12, 13, 14]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert b.position_ids[1].tolist()[2:] == [0, 1, 2, 3]
    assert b.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b.rollout_logprobs[0].tolist() == [-0.5, -0.25, 0.0]
    assert response_tokens(b).tolist() == [[10, 11, 0], [12, 13, 14]]


def test_left_padded_logprobs_equal_unpadded(tiny_dir):
    """The padded batch gives each row exactly the logprobs of its unpadded sequence."""
    model = load_causal_lm(tiny_dir, dtype=torch.float32).eval()
    prompts, responses = [[7, 8, 9, 20], [5, 6]], [[10, 11], [12, 13, 14, 15]]
    b = build_batch(prompts, responses, [[0.0] * 2, [0.0] * 4], pad_id=0)
    with torch.no_grad():
        got = token_logprobs(response_logits(model, b), response_tokens(b))
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            logits = model(input_ids=ids).logits[0, len(p) - 1 : -1]
            want = token_logprobs(logits, torch.tensor(r))
            torch.testing.assert_close(got[i, : len(r)], want, atol=1e-5, rtol=1e-5)


def _batch(scores, lengths, width=4):
    B = len(scores)
    mask = torch.zeros(B, width)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = torch.zeros(B, width + 2, dtype=torch.long)
    return Experience(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        position_ids=torch.zeros_like(ids),
        response_mask=mask,
        rollout_logprobs=-torch.ones(B, width) * mask,
        scores=torch.tensor(scores),
        old_logprobs=-torch.ones(B, width) * mask,
        ref_logprobs=-2 * torch.ones(B, width) * mask,
        values=torch.zeros(B, width),
    )


def test_group_advantages_with_kl_in_reward():
    b = _batch([1.0, 0.0, 1.0, 1.0], [2, 3, 1, 4])
    out, m = compute_advantages(
        b,
        algorithm="grpo",
        group_size=2,
        kl_coef=0.1,
        kl_estimator="k1",
        kl_in_reward=True,
        gamma=1.0,
        lam=1.0,
    )
    # k1 per token = -1 - (-2) = 1; sequence scores minus 0.1 * length: 0.8, -0.3 | 0.9, 0.6.
    a = out.advantages
    assert a[0, 0] > 0 > a[1, 0] and a[2, 0] > 0 > a[3, 0]
    assert (a[0, 2:] == 0).all() and (a[2, 1:] == 0).all()  # nothing outside the response
    torch.testing.assert_close(m["kl/mean_per_sequence"], 2.5)


def test_ppo_advantages_reward_at_last_token():
    b = _batch([1.0, 0.0], [2, 3])
    out, _ = compute_advantages(
        b,
        algorithm="ppo",
        group_size=1,
        kl_coef=0.0,
        kl_estimator="k1",
        kl_in_reward=True,
        gamma=1.0,
        lam=1.0,
        whiten=False,
    )
    # Zero values, gamma = lam = 1: every token's advantage is the final score.
    assert out.advantages[0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out.returns[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_rank_slices_and_minibatches_cover_every_row():
    rows = [list(range(*rank_bounds(10, r, 3))) for r in range(3)]
    assert sum(rows, []) == list(range(10))
    mbs = minibatches(12, 4, epoch_seed=3)
    assert sorted(torch.cat(mbs).tolist()) == list(range(12)) and len(mbs) == 3
    parts = [torch.ones(2, 3), torch.ones(1, 5)]
    assert concat_rows(parts).shape == (3, 5)


def test_groups_with_signal_marks_groups_whose_scores_differ():
    scores = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5 + 1e-3]
    assert groups_with_signal(scores, 2) == [False, True, False, True]
    assert groups_with_signal(scores, 4) == [True, True]
    assert groups_with_signal([0.3] * 3, 3) == [False]
    with pytest.raises(ValueError, match="7 scores are not whole groups of 2"):
        groups_with_signal(scores[:7], 2)


def test_experience_checks_shapes_and_slices_every_filled_field_together():
    b = _batch([1.0, 0.0, 1.0], [2, 3, 1])
    with pytest.raises(ValueError, match=r"Experience.values: shape \(3, 5\), expected \(3, 4\)"):
        b.replace(values=torch.zeros(3, 5))
    part = b.take(torch.tensor([2, 0]))
    assert part.num_rows == 2 and part.scores.tolist() == [1.0, 1.0]
    assert part.response_mask.sum(-1).tolist() == [1.0, 2.0] and part.advantages is None
    assert b.rows(1, 3).scores.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"missing \['advantages'\]: their phase has not run"):
        b.need("scores", "advantages")
