"""GAE, discounted returns and the group baselines: worked values and plain-loop parity."""

import torch

from rlhf.algorithms import (
    ADVANTAGE_ESTIMATORS,
    discounted_returns,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    masked_whiten,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)


def ragged_mask(lengths, width):
    return torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])


def test_gae_on_a_two_token_response_matches_the_hand_computation():
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 9.0]])  # the padded value 9.0 must be ignored
    mask = ragged_mask([2], 3)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # delta1 = 1 + 0 - 0.2 = 0.8; delta0 = 0 + 0.9*0.2 - 0.5 = -0.32
    # A1 = 0.8; A0 = -0.32 + 0.9*0.8*0.8 = 0.256
    torch.testing.assert_close(adv, torch.tensor([[0.256, 0.8, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.756, 1.0, 0.0]]))


def loop_gae(rewards, values, lengths, gamma, lam):
    adv = torch.zeros_like(values)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            nv = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * nv - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv


def test_gae_matches_a_plain_loop_on_ragged_batches_with_length_one_rows():
    torch.manual_seed(0)
    lengths = [5, 1, 3, 0, 2]
    mask = ragged_mask(lengths, 5)
    rewards, values = torch.randn(5, 5) * mask, torch.randn(5, 5)
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    expected = loop_gae(rewards, values, lengths, 0.95, 0.9)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, (expected + values) * mask)
    assert adv[3].abs().sum() == 0  # the all-masked row stays zero


def test_discounted_returns_match_a_plain_loop():
    torch.manual_seed(1)
    lengths = [4, 1, 2]
    mask = ragged_mask(lengths, 4)
    rewards = torch.randn(3, 4) * mask
    got = discounted_returns(rewards, mask, gamma=0.5)
    for b, n in enumerate(lengths):
        for t in range(n):
            want = sum(0.5**k * rewards[b, t + k].item() for k in range(n - t))
            assert abs(got[b, t].item() - want) < 1e-6


def test_grpo_normalises_within_each_group_and_zeroes_a_constant_group():
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    mask = torch.ones(8, 2)
    adv = grpo_advantages(scores, mask, group_size=4)[:, 0]
    # group 1: mean 0.5, unbiased std sqrt(1/3) = 0.57735 -> +-0.866025
    torch.testing.assert_close(
        adv[:4], torch.tensor([0.866025, -0.866025, 0.866025, -0.866025]), atol=1e-5, rtol=0
    )
    assert torch.equal(adv[4:], torch.zeros(4)) and torch.isfinite(adv).all()


def test_dr_grpo_and_rloo_baselines():
    scores = torch.tensor([3.0, 1.0, 2.0])
    mask = torch.ones(3, 1)
    # mean 2 -> [1, -1, 0]
    torch.testing.assert_close(
        dr_grpo_advantages(scores, mask, 3)[:, 0], torch.tensor([1.0, -1.0, 0.0])
    )
    # leave-one-out: 3 - 1.5, 1 - 2.5, 2 - 2 -> [1.5, -1.5, 0]
    torch.testing.assert_close(
        rloo_advantages(scores, mask, 3)[:, 0], torch.tensor([1.5, -1.5, 0.0])
    )


def test_group_estimators_match_a_plain_loop_on_random_groups():
    torch.manual_seed(2)
    n, groups = 4, 3
    scores = torch.randn(n * groups)
    mask = ragged_mask([3, 1, 2, 4] * groups, 4)
    dr, rl = dr_grpo_advantages(scores, mask, n), rloo_advantages(scores, mask, n)
    for g in range(groups):
        block = scores[g * n : (g + 1) * n].tolist()
        for i in range(n):
            row = g * n + i
            others = [x for j, x in enumerate(block) if j != i]
            assert abs(dr[row, 0] - (block[i] - sum(block) / n)) < 1e-6
            assert abs(rl[row, 0] - (block[i] - sum(others) / (n - 1))) < 1e-6
            assert torch.equal(dr[row] == 0, mask[row] == 0) or block[i] == sum(block) / n


def test_reinforce_pp_whitens_over_all_response_tokens():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = ragged_mask([1, 2, 1, 2], 2)
    adv = reinforce_pp_advantages(scores, mask, group_size=2)
    flat = adv[mask > 0]
    assert abs(flat.mean().item()) < 1e-6 and abs(flat.std().item() - 1.0) < 1e-4
    assert torch.equal(adv[mask == 0], torch.zeros(2))
    base = reinforce_pp_baseline_advantages(scores, mask, group_size=2)
    # group-centred scores are [-0.5, 0.5, -0.5, 0.5] before whitening
    expected = masked_whiten(torch.tensor([-0.5, 0.5, -0.5, 0.5]).unsqueeze(-1) * mask, mask)
    torch.testing.assert_close(base, expected)


def test_every_estimator_is_selectable_by_name():
    assert set(ADVANTAGE_ESTIMATORS) == {
        "gae",
        "grpo",
        "dr_grpo",
        "rloo",
        "reinforce_pp",
        "reinforce_pp_baseline",
    }
