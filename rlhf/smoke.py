"""GPU smoke run: every stage of configs/tiny_cpu.yaml for a few steps on one GPU.

    make gpu-smoke                                   # the tiny model, built on the fly
    make gpu-smoke MODEL=/mnt/models/Qwen2.5-0.5B    # or a local HF checkpoint
    python -m rlhf.smoke [--model PATH] [--out DIR] [key=value ...]

For a machine with a CUDA GPU and the GPU build (`make venv TORCH=torch EXTRAS=gpu,dev`): pretrain,
SFT, reward model and DPO as one-GPU Ray Train jobs, then PPO with policy, reference, critic and a
vLLM engine sharing the GPU, weights synced by the bucketed broadcast (gloo: NCCL cannot join
two ranks on one GPU; the protocol is the one NCCL runs between separate GPUs). Without a GPU it
stops at once with an error, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/tiny_cpu.yaml"


def smoke_overrides(model: str | None, out_dir: str) -> list[str]:
    """Dotted overrides that shrink configs/tiny_cpu.yaml to a few steps per stage on one GPU."""
    out = [f"run.output_dir={out_dir}", "run.name=gpu_smoke", "eval.num_prompts=16"]
    if model:
        out += [f"model.path={model}", "rl.max_prompt_length=256"]
    for stage in ("pretrain", "sft", "rm", "dpo"):
        out += [
            f"{stage}.use_gpu=true",
            f"{stage}.num_workers=1",
            f"{stage}.max_steps=5",
            f"{stage}.warmup_steps=1",
            f"{stage}.eval_interval=5",
            f"{stage}.save_interval=5",
            f"{stage}.micro_batch_tokens=null",  # a GPU stage trains on DeepSpeed
        ]
    return out + [
        "rl.max_steps=2",
        "rl.prompts_per_step=8",
        "rl.samples_per_prompt=4",
        "rl.mini_batch_size=32",
        "rl.filter_groups=false",
        "rl.eval_interval=2",
        "rl.eval_prompts=16",
        "rl.save_interval=2",
        "rl.colocate=[[policy, reference, critic, rollout]]",
        "rl.policy.gpus_per_actor=0.25",
        "rl.policy.micro_batch_size=8",
        "rl.policy.warmup_steps=1",
        "rl.reference.gpus_per_actor=0.2",
        "rl.critic.gpus_per_actor=0.25",
        "rl.critic.micro_batch_size=8",
        "rl.critic.warmup_steps=1",
        "rl.rollout.backend=vllm",  # the CPU demo samples in the policy's actor
        "rl.rollout.gpus_per_engine=0.3",
        "rl.rollout.gpu_memory_utilization=0.3",
        "rl.rollout.kv_cache_gb=1",
        "rl.rollout.weight_sync=gloo",
        "rl.rollout.weight_bucket_mb=64",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf.smoke", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default=None, help="local HF checkpoint; default: tiny model")
    parser.add_argument("--out", default="runs", help="run.output_dir (default: runs)")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            f"error: make gpu-smoke needs a CUDA GPU; torch {torch.__version__} sees none "
            "(on a GPU machine build the GPU venv: make venv TORCH=torch EXTRAS=gpu,dev)",
            file=sys.stderr,
        )
        return 2
    from rlhf.cli import main as cli_main

    overrides = smoke_overrides(args.model, args.out) + args.overrides
    return cli_main(["run", str(CONFIG), *overrides])


if __name__ == "__main__":
    sys.exit(main())
