"""The torch engine (rlhf/engine.py `TorchEngine`): one CPU rank's optimizer step without
DeepSpeed. It must give DeepSpeed's update, train, and resume from its own checkpoint exactly.

Runs in this process: the DeepSpeed side needs a process group, a gloo group of one rank on
loopback that the fixture tears down again.
"""

import copy
import math
import socket

import pytest
import torch
import torch.distributed as dist

from rlhf import engine as eng
from rlhf.models.factory import build_tiny_model
from rlhf.train.core import accumulate, load_part, save_part

SIZE = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64)
SETTINGS = dict(
    lr=1e-2,
    betas=(0.9, 0.95),
    weight_decay=0.1,
    warmup_steps=2,
    max_steps=8,
    min_lr_ratio=0.1,
    zero_stage=2,
    micro_batch_size=4,
    grad_accum_steps=2,
    grad_clip=0.5,  # below the gradient norms of these batches: clipping is exercised
    dtype=torch.float32,
)


def _batches(step: int) -> list[dict[str, torch.Tensor]]:
    """The 2 micro-batches (4 x 12 tokens each) of optimizer step `step`."""
    gen = torch.Generator().manual_seed(step)
    out = []
    for _ in range(SETTINGS["grad_accum_steps"]):
        ids = torch.randint(3, 200, (4, 12), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _loss(model, batch):
    """Mean next-token NLL of the step's 96 tokens (2 micro-batches x 4 x 12), per micro-batch."""
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    return out.loss / SETTINGS["grad_accum_steps"], {"loss": out.loss.item()}


def _train(engine, steps: range) -> list[float]:
    """Optimizer steps through the shared training core; the mean loss of each step."""
    losses = []
    for step in steps:
        sums, count, bad = accumulate(
            engine, _batches(step), lambda b: _loss(engine.module, b), 1, 2
        )
        assert bad == 0
        losses.append(sums["loss"] / count)
    return losses


def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.fixture
def one_rank_group(monkeypatch):
    """A gloo process group of one rank on loopback (what Ray Train gives a single worker)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_torch_engine_gives_deepspeeds_update_with_accumulation_clipping_and_schedule(
    one_rank_group,
):
    model = build_tiny_model(seed=0, **SIZE)
    ds = eng.init_engine(copy.deepcopy(model), **SETTINGS)
    pt = eng.init_engine(copy.deepcopy(model), **SETTINGS, backend="torch")
    assert isinstance(pt, eng.TorchEngine) and not isinstance(ds, eng.TorchEngine)
    for step in range(3):  # warmup (lr 0.5x, 1x), then the cosine
        ds_loss, pt_loss = _train(ds, range(step, step + 1)), _train(pt, range(step, step + 1))
        assert pt_loss == pytest.approx(ds_loss, rel=1e-5)
        assert pt.get_lr() == pytest.approx(ds.get_lr(), rel=1e-9)
        assert eng.global_grad_norm(pt) > SETTINGS["grad_clip"]  # the clip was active
        assert eng.global_grad_norm(pt) == pytest.approx(eng.global_grad_norm(ds), rel=1e-4)
        w_ds, w_pt, start = _weights(ds), _weights(pt), model.state_dict()
        for k in w_ds:
            # Same update up to float rounding: well inside 1e-3 of how far the step moved it.
            moved = (w_ds[k] - start[k]).abs().max()
            assert moved > 0, k
            torch.testing.assert_close(w_pt[k], w_ds[k], rtol=0, atol=1e-3 * float(moved))


def test_the_torch_engine_lowers_the_loss_without_any_process_group():
    assert not dist.is_initialized()
    engine = eng.init_engine(build_tiny_model(seed=0, **SIZE), **SETTINGS, backend="torch")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (4, 12), generator=gen)
    batch = {"input_ids": ids, "labels": ids}  # one batch, learnt by heart
    losses = []
    for _ in range(6):
        sums, _, _ = accumulate(engine, [batch, batch], lambda b: _loss(engine.module, b), 1, 2)
        losses.append(sums["loss"] / 2)
    assert losses[-1] < 0.8 * losses[0], losses


def test_the_torch_engine_resumes_from_its_checkpoint_exactly(tmp_path):
    model = build_tiny_model(seed=0, **SIZE)
    straight = eng.init_engine(copy.deepcopy(model), **SETTINGS, backend="torch")
    _train(straight, range(2))
    save_part(straight, tmp_path, {"step": 2}, rank=0, world=1, step=2, fingerprint="x")
    assert {p.name for p in (tmp_path / "engine").iterdir()} == {
        "model.safetensors",
        "optimizer.pt",
        "engine.json",
    }
    _train(straight, range(2, 5))

    resumed = eng.init_engine(copy.deepcopy(model), **SETTINGS, backend="torch")
    assert load_part(resumed, tmp_path) == {"step": 2}
    _train(resumed, range(2, 5))
    assert resumed.get_lr() == straight.get_lr()
    for k, v in _weights(straight).items():
        assert torch.equal(v, _weights(resumed)[k]), k


def test_the_torch_engine_refuses_a_checkpoint_it_did_not_write(tmp_path):
    (tmp_path / "engine").mkdir()  # what a DeepSpeed part looks like to it: no engine.json
    engine = eng.init_engine(build_tiny_model(seed=0, **SIZE), **SETTINGS, backend="torch")
    with pytest.raises(RuntimeError, match="no torch-engine state under .*DeepSpeed checkpoint"):
        eng.load_engine_state(engine, tmp_path / "engine")


def test_the_torch_engine_skips_a_step_with_a_non_finite_loss_and_keeps_the_weights():
    engine = eng.init_engine(build_tiny_model(seed=0, **SIZE), **SETTINGS, backend="torch")
    before = _weights(engine)

    def nan_loss(batch):
        loss, metrics = _loss(engine.module, batch)
        return loss * float("nan"), metrics

    _, _, bad = accumulate(engine, _batches(0), nan_loss, 1, 2)
    assert bad == 2 and engine.optimizer.last_step_skipped and engine.optimizer.skipped_steps == 1
    for k, v in _weights(engine).items():
        assert torch.equal(v, before[k]), k
    _train(engine, range(1, 2))  # the next finite step trains again
    assert not engine.optimizer.last_step_skipped


class _InfGradient(torch.autograd.Function):
    """0 in the forward; an inf gradient for its input in the backward."""

    @staticmethod
    def forward(ctx, x):
        return x * 0.0

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def test_the_torch_engine_skips_a_step_whose_gradient_is_not_finite():
    engine = eng.init_engine(build_tiny_model(seed=0, **SIZE), **SETTINGS, backend="torch")
    before = _weights(engine)

    def inf_gradient(batch):  # a finite loss; one weight's gradient is inf
        loss, metrics = _loss(engine.module, batch)
        return loss + _InfGradient.apply(engine.module.lm_head.weight[0, 0]), metrics

    _, _, bad = accumulate(engine, _batches(0), inf_gradient, 1, 2)
    assert bad == 0  # the losses were finite: the guard found it in the gradient norm
    assert engine.optimizer.last_step_skipped and engine.optimizer.skipped_steps == 1
    assert not math.isfinite(engine.get_global_grad_norm())
    for k, v in _weights(engine).items():
        assert torch.equal(v, before[k]), k
