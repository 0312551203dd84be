"""rlhf/rl/worker.py pieces that need no Ray: the PPO-ptx stream."""

import torch

from rlhf.rl.worker import ptx_stream


def test_ptx_batches_arrive_on_the_training_device():
    # On a CPU machine "meta" stands in for a GPU: a batch left on the CPU fails the check, as
    # it would fail the policy's forward pass on cuda:0. (What runs on a GPU is not covered.)
    rows = [{"input_ids": [1, 2, 3 + i], "labels": [-100, 2, 3 + i]} for i in range(6)]
    batch = next(ptx_stream(rows, batch_size=2, seed=0, device="meta"))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.device == torch.device("meta") for t in batch.values())
    cpu = next(ptx_stream(rows, batch_size=2, seed=0))
    assert cpu["input_ids"].shape == (2, 3) and cpu["input_ids"].device.type == "cpu"
