"""The policy's training engine: one CPU actor in fp32 trains with plain torch (`engine: auto`),
and makes the update DeepSpeed makes."""

import pytest
from test_passes import ON_POLICY, _weights
from test_rl_loop import _coin, rl_config

from rlhf.config import ConfigError
from rlhf.rl.trainer import RLRun


def test_the_torch_engine_is_chosen_only_where_it_fits(tmp_path):
    cfg = rl_config(tmp_path)
    assert cfg.rl.policy.engine_backend == "torch" and cfg.rl.critic.engine_backend == "torch"
    two = rl_config(tmp_path, "rl.policy.num_actors=2", "rl.colocate=[]", "rl.colocate_cpus=null")
    assert two.rl.policy.engine_backend == "deepspeed"
    with pytest.raises(ConfigError, match=r"engine='torch' trains one CPU actor in fp32"):
        rl_config(tmp_path, "rl.policy.engine=torch", "rl.policy.precision=bf16")


def _one_step(tmp_path, tiny_dir, engine: str) -> tuple[dict, dict, dict]:
    cfg = rl_config(tmp_path / engine, *ON_POLICY, f"rl.policy.engine={engine}")
    run = RLRun(cfg, str(tiny_dir), None, reward_fn=lambda question, answer, label: _coin(answer))
    try:
        before = _weights(run)
        metrics = run.step(0)
        return before, _weights(run), metrics
    finally:
        run.shutdown()


@pytest.mark.timeout(900)
def test_one_rl_step_through_torch_makes_the_deepspeed_update(tmp_path, tiny_dir, ray_cluster):
    w0, w_ds, m_ds = _one_step(tmp_path, tiny_dir, "deepspeed")
    w0_t, w_t, m_t = _one_step(tmp_path, tiny_dir, "torch")
    assert all((w0[k] == w0_t[k]).all() for k in w0)  # the same start
    for key in ("reward/score_mean", "response/length_mean", "advantages/abs_mean"):
        assert m_ds[key] == m_t[key], key  # the same samples
    assert m_ds["policy/lr"] == m_t["policy/lr"]
    moved = max((w_ds[k] - w0[k]).abs().max().item() for k in w0)
    apart = max((w_ds[k] - w_t[k]).abs().max().item() for k in w0)
    assert moved > 1e-3, moved
    assert apart <= 1e-4 * moved, (apart, moved)
