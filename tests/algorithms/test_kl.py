"""KL estimators, KL in the reward vs as a loss, and the controllers."""

import math

import pytest
import torch

from rlhf.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_loss,
    kl_penalized_rewards,
)


def test_estimators_on_one_token():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # log r = log(0.25/0.5) = -log 2
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    assert kl_k2(logp, ref).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 - 1 + math.log(2))  # r - 1 - log r


def test_k3_is_nonnegative_and_finite_for_extreme_log_ratios():
    logp = torch.tensor([0.0, -1e4, 1e4, -3.0])
    ref = torch.tensor([-1e4, 0.0, -1e4, -3.0])
    k3 = kl_k3(logp, ref)
    assert torch.isfinite(k3).all() and (k3 >= 0).all() and k3[3] == 0


def test_kl_penalty_goes_into_every_token_and_the_score_onto_the_last():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    rewards = kl_penalized_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.9, 0.0], [1.75, 0.0, 0.0]]))


def test_kl_penalty_ignores_the_score_of_an_empty_response():
    rewards = kl_penalized_rewards(torch.tensor([5.0]), torch.zeros(1, 2), torch.zeros(1, 2), 0.1)
    assert torch.equal(rewards, torch.zeros(1, 2))


def test_kl_loss_has_zero_value_and_gradient_at_the_reference_and_pulls_back_otherwise():
    ref = torch.tensor([[-1.0, -2.0]])
    logp = ref.clone().requires_grad_(True)
    loss, _ = kl_loss(logp, ref, torch.ones(1, 2), kl_coef=0.1)
    loss.backward()
    assert loss.item() == 0 and torch.equal(logp.grad, torch.zeros(1, 2))
    logp2 = (ref + 1.0).requires_grad_(True)
    loss2, _ = kl_loss(logp2, ref, torch.ones(1, 2), kl_coef=0.1)
    loss2.backward()
    assert loss2.item() > 0 and (logp2.grad > 0).all()  # descent lowers logp towards ref


def test_adaptive_controller_raises_beta_above_target_with_clipped_error():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 12 -> error clipped to 0.2 -> beta * (1 + 0.2 * 256 / 10000)
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl2 = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl2.update(3.0, 256) < 0.1
    assert FixedKLController(0.05).update(100.0, 256) == 0.05


def test_kl_loss_weights_each_token_by_the_detached_importance_ratio():
    logp = torch.tensor([[math.log(0.5), math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    mask = torch.ones(1, 2)
    # k3 per token: [0.5 - 1 + log 2, 0]; ratios [2, 1]: token_mean = (2 * 0.193 + 0) / 2
    ratio = torch.tensor([[2.0, 1.0]])
    weighted, _ = kl_loss(logp, ref, mask, kl_coef=1.0, ratio=ratio)
    assert weighted.item() == pytest.approx((0.5 - 1 + math.log(2)) * 2 / 2)
    plain, _ = kl_loss(logp, ref, mask, kl_coef=1.0)
    on_policy, _ = kl_loss(logp, ref, mask, kl_coef=1.0, ratio=torch.ones(1, 2))
    assert on_policy.item() == pytest.approx(plain.item())
    # The ratio reweights samples; it is not differentiated: the gradient is ratio * dk3.
    (g_weighted,) = torch.autograd.grad(weighted, logp)
    (g_plain,) = torch.autograd.grad(plain, logp)
    assert torch.allclose(g_weighted, g_plain * ratio)
