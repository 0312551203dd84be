"""TRL's side of the side-by-side benchmark: one GRPO or SFT job with TRL's own trainers, timed
per optimizer step. It runs in the benchmark venv (`make bench` builds `.bench-venv` with a pinned
TRL; TRL is no dependency of this project), started by `python -m rlhf.bench trl`:

    .bench-venv/bin/python -m rlhf.bench_trl JOB.json      # prints one JSON line

JOB.json comes from rlhf/bench_vs_trl.py: the model folder both sides load, the data file both
sides read (prompts rendered by our code with their token ids, or our tokenized SFT rows) and the
settings both sides share. `grpo_args` / `sft_args` turn it into TRL's config; they import
nothing, so a test in the main venv checks the translation. Step time is the wall time between
the ends of consecutive optimizer steps (generation, reward, reference, loss, backward, update,
data loading and logging all inside); start-up is from the start of this process to the first
step.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()


def _common_args(job: dict) -> dict:
    """TrainingArguments both trainers share: fp32 on CPU, constant lr, our AdamW betas and
    clipping, no checkpoints, no evaluation, no reporting. Gradient checkpointing (a TRL default)
    is off: we do not recompute activations either."""
    return dict(
        output_dir=job["out_dir"],
        max_steps=job["steps"],
        learning_rate=job["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=job["betas"][0],
        adam_beta2=job["betas"][1],
        max_grad_norm=job["grad_clip"],
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        gradient_accumulation_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=job["steps"],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=job["seed"],
    )


def grpo_args(job: dict) -> dict:
    """GRPOConfig keyword arguments: `prompts_per_step` prompts x `samples_per_prompt` samples per
    optimizer step (one generation batch, one update: on-policy, no old-logprob pass), a k3 KL
    loss to the reference with coefficient `kl_coef`, token-mean loss, group-std scaling."""
    return dict(
        _common_args(job),
        per_device_train_batch_size=job["prompts_per_step"] * job["samples_per_prompt"],
        num_generations=job["samples_per_prompt"],
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=job["max_new_tokens"],
        temperature=job["temperature"],
        top_p=1.0,
        top_k=0,
        beta=job["kl_coef"],
        epsilon=job["clip_eps"],
        loss_type="dapo",  # per-token mean over the batch: our loss_mode=token_mean
        scale_rewards="group",
        model_init_kwargs={"dtype": "float32"},
        log_completions=False,
    )


def sft_args(job: dict) -> dict:
    """SFTConfig keyword arguments: `batch_size` rows per optimizer step, pre-tokenized rows used
    as they are (our labels, -100 on prompt tokens), no packing."""
    return dict(
        _common_args(job),
        per_device_train_batch_size=job["batch_size"],
        max_length=job["max_length"],
        packing=False,
        padding_free=False,
        model_init_kwargs={"dtype": "float32"},
    )


def step_seconds(first_begin: float, ends: list[float]) -> list[float]:
    """Per-step wall times from the first step's start and every step's end."""
    marks = [first_begin, *ends]
    return [b - a for a, b in zip(marks, marks[1:])]


def _timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.first_begin: float | None = None
            self.ends: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if self.first_begin is None:
                self.first_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepTimer()


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _digit_match():
    """The project's reward rule itself (rlhf/rl/rewards.py imports only the standard library)."""
    from rlhf.rl.rewards import RULES

    return RULES["digit_match"]


def run_grpo(job: dict, timer) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    rows = _rows(job["data"])
    for row in rows:  # the text TRL tokenizes must give our token ids exactly
        got = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        if got != row["prompt_ids"]:
            raise SystemExit(f"error: prompt {row['prompt']!r} tokenizes to {got}, not ours")
    rule = _digit_match()

    def reward(prompts, completions, label, **kwargs):
        return [rule(p, c, y) for p, c, y in zip(prompts, completions, label)]

    data = Dataset.from_list([{"prompt": r["prompt"], "label": r["label"]} for r in rows])
    trainer = GRPOTrainer(
        model=job["model_dir"],
        reward_funcs=reward,
        args=GRPOConfig(**grpo_args(job)),
        train_dataset=data,
        processing_class=tok,
        callbacks=[timer],
    )
    trainer.train()


def run_sft(job: dict, timer) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in _rows(job["data"])]
    trainer = SFTTrainer(
        model=job["model_dir"],
        args=SFTConfig(**sft_args(job)),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[timer],
    )
    trainer.train()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m rlhf.bench_trl JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    import torch
    import transformers
    import trl

    timer = _timer()
    {"grpo": run_grpo, "sft": run_sft}[job["kind"]](job, timer)
    if timer.first_begin is None:
        raise SystemExit("error: TRL ran no step")
    result = {
        "step_s": step_seconds(timer.first_begin, timer.ends),
        "startup_s": timer.first_begin - STARTED,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
    print("TRL_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
