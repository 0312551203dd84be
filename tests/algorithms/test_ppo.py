"""PPO policy and value losses, entropy, PPO-ptx and truncated importance sampling."""

import pytest
import torch

from rlhf.algorithms import (
    aggregate_loss,
    entropy_from_logits,
    ppo_policy_loss,
    ppo_ptx_loss,
    truncated_is_weights,
    value_loss,
)


def one(ratio, adv, **kw):
    logp = torch.tensor([[float(torch.log(torch.tensor(ratio)))]], requires_grad=True)
    loss, m = ppo_policy_loss(
        logp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), **kw
    )
    loss.backward()
    return loss.item(), logp.grad.item(), m


def test_policy_loss_is_clipped_when_ratio_exceeds_one_plus_eps_and_passes_no_gradient():
    loss, grad, m = one(1.5, 1.0, clip_eps_low=0.2)
    assert loss == pytest.approx(-1.2)  # -A * clip(1.5) = -1.2
    assert grad == 0.0 and m["ppo/clipfrac"] == 1.0


def test_policy_loss_inside_the_trust_region_has_the_ratio_gradient():
    loss, grad, m = one(1.1, 2.0)
    assert loss == pytest.approx(-2.2)
    assert grad == pytest.approx(-2.2)  # d(-A r)/dlogp = -A r
    assert m["ppo/clipfrac"] == 0.0


def test_clip_higher_lets_positive_advantages_rise_further():
    assert one(1.25, 1.0, clip_eps_low=0.2)[0] == pytest.approx(-1.2)
    assert one(1.25, 1.0, clip_eps_low=0.2, clip_eps_high=0.28)[0] == pytest.approx(-1.25)


def test_dual_clip_caps_the_loss_of_negative_advantages_with_huge_ratios():
    loss, grad, _ = one(10.0, -1.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0) and grad == 0.0  # without dual clip: 10
    assert one(10.0, -1.0)[0] == pytest.approx(10.0)


def test_policy_loss_matches_a_plain_loop_on_a_ragged_batch():
    torch.manual_seed(0)
    logp, old, adv = torch.randn(4, 5) * 0.3, torch.randn(4, 5) * 0.3, torch.randn(4, 5)
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in (5, 1, 3, 2)])
    loss, _ = ppo_policy_loss(logp, old, adv, mask, clip_eps_low=0.2)
    total, count = 0.0, 0
    for b in range(4):
        for t in range(5):
            if mask[b, t]:
                r = torch.exp(logp[b, t] - old[b, t]).item()
                a = adv[b, t].item()
                total += max(-a * r, -a * min(max(r, 0.8), 1.2))
                count += 1
    assert loss.item() == pytest.approx(total / count, abs=1e-6)


def test_extreme_log_ratios_and_all_masked_rows_stay_finite():
    logp = torch.tensor([[1e4, -1e4], [0.0, 0.0]])
    loss, m = ppo_policy_loss(
        logp,
        torch.zeros(2, 2),
        torch.ones(2, 2),
        torch.tensor([[1.0, 1.0], [0.0, 0.0]]),
        dual_clip=3.0,
    )
    assert torch.isfinite(loss) and all(v == v for v in m.values())
    empty, _ = ppo_policy_loss(logp, torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2, 2))
    assert empty.item() == 0.0


def test_value_loss_clipping_takes_the_pessimistic_branch():
    values, old, ret = torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[3.0]])
    plain, _ = value_loss(values, old, ret, torch.ones(1, 1))
    assert plain.item() == pytest.approx(0.5)  # 0.5 * (2 - 3)^2
    clipped, m = value_loss(values, old, ret, torch.ones(1, 1), value_clip=0.5)
    assert clipped.item() == pytest.approx(0.5 * 2.5**2)  # clip(V) = 0.5, (0.5 - 3)^2
    assert m["critic/clipfrac"] == 1.0


def test_aggregation_modes():
    loss = torch.tensor([[1.0, 3.0], [5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert aggregate_loss(loss, mask, "token_mean").item() == pytest.approx(3.0)  # 9 / 3
    assert aggregate_loss(loss, mask, "seq_mean").item() == pytest.approx(3.5)  # (2 + 5) / 2
    assert aggregate_loss(loss, mask, "seq_sum").item() == pytest.approx(4.5)  # (4 + 5) / 2
    assert aggregate_loss(loss, mask, "token_mean", normaliser=9).item() == pytest.approx(1.0)


def test_entropy_of_a_uniform_distribution_is_log_vocab():
    ent = entropy_from_logits(torch.zeros(1, 1, 8))
    assert ent.item() == pytest.approx(torch.log(torch.tensor(8.0)).item())


def test_ppo_ptx_adds_the_pretraining_nll_with_its_coefficient():
    pg = torch.tensor(0.3)
    ptx_logprobs = torch.tensor([[-2.0, -4.0]])
    total, m = ppo_ptx_loss(pg, ptx_logprobs, torch.ones(1, 2), ptx_coef=0.5)
    assert total.item() == pytest.approx(0.3 + 0.5 * 3.0)
    assert m["ppo/ptx_loss"] == pytest.approx(3.0)


def test_truncated_is_weights_clamp_and_report_the_gap():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    rollout = torch.tensor([[0.0, -0.1, -2.0]])  # ratios 1, e^0.1, e^2 -> capped at 2
    w, m = truncated_is_weights(old, rollout, torch.ones(1, 3), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.105171, 2.0]]))
    assert m["rollout/logprob_gap"] == pytest.approx(0.7)
    assert m["rollout/logprob_gap_max"] == pytest.approx(2.0)
    assert m["rollout/is_clamped_frac"] == pytest.approx(1 / 3)
