"""LM loss normalisation and the preference losses (RM ranking, DPO, cDPO, IPO)."""

import math

import pytest
import torch

from rlhf.algorithms import dpo_loss, ipo_loss, lm_loss, reward_pairwise_loss, token_logprobs


def test_token_logprobs_match_log_softmax_and_stay_finite_for_huge_logits():
    logits = torch.tensor([[[0.0, math.log(3.0)], [1e4, -1e4]]])  # (1, 2, 2)
    labels = torch.tensor([[1, 1]])
    got = token_logprobs(logits, labels)
    # p = 3/(1+3) = 0.75; second position: log softmax of -1e4 vs 1e4 is -2e4
    torch.testing.assert_close(got, torch.tensor([[math.log(0.75), -2e4]]))


def test_micro_batch_losses_with_a_global_token_count_sum_to_the_big_batch_gradient():
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    x = torch.randn(6, 5, 4)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[2] = 0  # an all-masked row

    def logprobs(rows):
        return torch.nn.functional.logsigmoid(x[rows] @ w)

    full, _ = lm_loss(logprobs(slice(0, 6)), mask)
    (g_full,) = torch.autograd.grad(full, w)
    total = mask.sum().item()
    parts = [
        lm_loss(logprobs(slice(i, i + 2)), mask[i : i + 2], normaliser=total)[0]
        for i in range(0, 6, 2)
    ]
    (g_parts,) = torch.autograd.grad(sum(parts), w)
    torch.testing.assert_close(g_full, g_parts)
    # with per-micro-batch means instead the gradient differs (the bug this guards against)
    naive = sum(lm_loss(logprobs(slice(i, i + 2)), mask[i : i + 2])[0] for i in range(0, 6, 2))
    (g_naive,) = torch.autograd.grad(naive / 3, w)
    assert not torch.allclose(g_full, g_naive)


def test_reward_ranking_loss_value_accuracy_and_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    loss, m = reward_pairwise_loss(chosen, rejected)
    # -log sigmoid(2) = 0.126928, -log sigmoid(-1) = 1.313262, mean 0.720095
    assert loss.item() == pytest.approx(0.720095, abs=1e-5)
    assert m["rm/accuracy"] == 0.5 and m["rm/margin"] == pytest.approx(0.5)
    loss_m, _ = reward_pairwise_loss(chosen, rejected, margin=1.0)
    assert loss_m.item() > loss.item()  # a margin asks for a wider gap


def test_dpo_at_the_reference_is_log_two_and_its_gradient_favours_chosen():
    pc = torch.tensor([-3.0], requires_grad=True)
    pr = torch.tensor([-3.0], requires_grad=True)
    loss, m = dpo_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    # d/dpc -log sigmoid(beta (pc - pr)) = -beta * sigmoid(0) = -0.05: descent raises pc
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)
    assert m["dpo/reward_accuracy"] == 0.0 and m["dpo/reward_margin"] == 0.0


def test_cdpo_label_smoothing_mixes_in_the_flipped_preference():
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    # h = (-1 + 2) - (-3 + 2) = 2, beta h = 0.2
    loss, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.2)
    expected = -0.8 * math.log(1 / (1 + math.exp(-0.2))) - 0.2 * math.log(1 / (1 + math.exp(0.2)))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_ipo_is_the_squared_distance_of_h_from_one_over_two_beta():
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    loss, m = ipo_loss(*args, beta=0.25)
    assert loss.item() == pytest.approx((2.0 - 2.0) ** 2)  # h = 2 = 1 / (2 * 0.25)
    assert m["dpo/reward_accuracy"] == 1.0


def test_nll_term_on_chosen_is_length_normalised():
    args = (torch.tensor([-4.0]), torch.tensor([-4.0]), torch.tensor([-4.0]), torch.tensor([-4.0]))
    base, _ = dpo_loss(*args, beta=0.1)
    with_nll, _ = dpo_loss(*args, beta=0.1, nll_coef=0.5, chosen_lengths=torch.tensor([2]))
    assert with_nll.item() - base.item() == pytest.approx(0.5 * 4.0 / 2)


def test_extreme_log_ratios_give_finite_losses():
    big = torch.tensor([1e4])
    for fn in (dpo_loss, ipo_loss):
        loss, _ = fn(big, -big, -big, big, beta=0.5)
        assert torch.isfinite(loss)
