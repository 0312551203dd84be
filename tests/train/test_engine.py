"""Learning-rate schedule and the non-finite guard of the optimizer (no process group needed)."""

import math

import pytest
import torch

from rlhf.engine import GuardedAdamW, warmup_cosine


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    kw = dict(warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [warmup_cosine(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # halfway through the decay cos(pi/2) = 0: 0.1 + 0.9 * 0.5 = 0.55
    assert warmup_cosine(9, **kw) == pytest.approx(0.55)
    assert warmup_cosine(14, **kw) == pytest.approx(0.1)
    assert warmup_cosine(100, **kw) == pytest.approx(0.1)


def test_guarded_adamw_skips_and_counts_a_step_with_a_nan_gradient():
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, math.nan, 1.0])
    opt.step()
    assert opt.skipped_steps == 1 and opt.last_step_skipped
    assert torch.equal(p.data, torch.ones(3))  # untouched
    assert not opt.state  # no moment estimates polluted by the NaN


def test_guarded_adamw_steps_normally_on_finite_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.ones(3)
    opt.step()
    assert opt.skipped_steps == 0 and not opt.last_step_skipped
    # Adam's first step moves every weight by lr against the gradient's sign.
    assert torch.allclose(p.data, torch.full((3,), 0.9))


def test_guarded_adamw_reads_the_verdict_from_a_given_gradient_norm():
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1, weight_decay=0.0, fused=True)  # the torch engine's
    p.grad = torch.ones(3)
    opt.step(grad_norm=math.inf)  # the norm of a gradient holding an inf
    assert opt.skipped_steps == 1 and torch.equal(p.data, torch.ones(3)) and not opt.state
    opt.step(grad_norm=math.sqrt(3.0))
    assert opt.skipped_steps == 1 and torch.allclose(p.data, torch.full((3,), 0.9))


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_frozen_model_goes_to_the_ranks_device_and_stops_learning(zero_stage):
    """The reference and reward model below ZeRO-3 stay plain modules: on the rank's device
    (a GPU rank's model on its GPU; found left on the CPU by the first GPU run, 2026-12-04)."""
    from rlhf.engine import init_frozen
    from rlhf.models.factory import build_tiny_model

    model = build_tiny_model(
        hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64
    )
    frozen = init_frozen(model, zero_stage, 4, torch.float32, torch.device("meta"))
    assert {p.device.type for p in frozen.parameters()} == {"meta"}
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
