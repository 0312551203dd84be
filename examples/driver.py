"""A driver script: SFT, then GRPO with a reward function written in Python, from one process.

    .venv/bin/python examples/driver.py                          # the demo's SFT and RL settings
    .venv/bin/python examples/driver.py sft.max_steps=50 rl.max_steps=5   # any dotted override

Outputs go to runs/driver_example/ (each stage's model/, metrics.jsonl, summary.json) as with
`rlhf run`; running it again skips the finished stages. The reward object runs in this process:
each RL step hands it every sampled answer.
"""

from __future__ import annotations

import sys

from rlhf import Pipeline


class CloseAnswer:
    """1.0 for the exact sum; 1 / (1 + |answer - sum|) / 2 for another number; 0.0 otherwise."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompt: str, response: str, label: str | None) -> float:
        self.calls += 1
        got, want = response.strip(), (label or "").strip()
        if got == want:
            return 1.0
        if not got.isdigit() or not want.isdigit():
            return 0.0
        return 0.5 / (1 + abs(int(got) - int(want)))


def main(overrides: list[str]) -> None:
    reward = CloseAnswer()
    with Pipeline(
        "configs/tiny_cpu.yaml",
        ["run.name=driver_example", "run.stages=[sft,rl]", "rl.algorithm=grpo", *overrides],
        reward_fn=reward,
    ) as pipeline:
        result = pipeline.run()
        for name, stage in result.stages.items():
            print(f"{name}: {stage.model} ({stage.wall_s:.0f} s)")
        print(f"sft held-out loss: {pipeline.outputs['sft'].metrics.get('sft/eval_loss')}")
        print(f"rl reward, last step: {result.stages['rl'].metrics['rl/reward/score_mean']:.3f}")
        print(f"answers scored by the reward object: {reward.calls}")


if __name__ == "__main__":
    main(sys.argv[1:])
