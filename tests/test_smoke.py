"""rlhf/smoke.py on a machine without a GPU: its config is valid, and it refuses to start."""

import pytest
import torch

from rlhf.config import load_config
from rlhf.smoke import CONFIG, main, smoke_overrides


@pytest.mark.parametrize("model", [None, "/models/some-checkpoint"])
def test_the_smoke_config_puts_every_stage_on_one_gpu(model, tmp_path):
    cfg = load_config(CONFIG, smoke_overrides(model, str(tmp_path)))
    assert cfg.run.stages == ["pretrain", "sft", "rm", "dpo", "rl"]
    assert cfg.model.path == model
    for stage in ("pretrain", "sft", "rm", "dpo"):
        assert getattr(cfg, stage).use_gpu and getattr(cfg, stage).num_workers == 1
    # All RL roles share one bundle of one GPU; weights by the bucketed broadcast over gloo.
    assert sum(r["GPU"] for r in cfg.rl.resource_requests().values()) == 1.0
    assert cfg.rl.weight_sync_backend == "gloo"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_it_stops_with_an_error_and_exit_code_2(capsys):
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("error: make gpu-smoke needs a CUDA GPU")
