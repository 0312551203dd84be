"""This project against TRL, side by side: the same Hugging Face model folder, the same data, the
same settings, median seconds per optimizer step on each side, and the ratio TRL / ours.

    python -m rlhf.bench trl                  # every job (12 steps each; long at 25M)
    python -m rlhf.bench trl --quick          # 3 steps per job: checks that it all runs
    python -m rlhf.bench trl --jobs grpo_0.4M_6tok sft_0.4M --steps 20 --warmup 3

TRL runs in its own venv (`--python`, default .bench-venv/bin/python; `make bench` builds it) as a
subprocess of rlhf/bench_trl.py; ours runs in this process through the Python API
(`Pipeline.run_stage`, the code `rlhf run` runs) on configs/tiny_cpu.yaml with the overrides of
`our_overrides`, and its step times come from the stage's metrics.jsonl (`rl/timing/step`,
`sft/timing/step`). Each job builds (or reuses) a randomly initialised byte-level Llama with
`ensure_tiny_model`; both sides load that folder in fp32. GRPO: `PROMPTS_PER_STEP` prompts x
`SAMPLES_PER_PROMPT` samples per step, one update per step, KL coefficient `KL_COEF` (k3, as a
loss), reward `digit_match` of rlhf/rl/rewards.py on both sides; our rollout engine is the job's
(`Job.rollout`: vLLM, transformers' generate in a rollout actor, or the same in the policy's actor; TRL uses transformers'); the prompts are rendered by our
code and TRL checks that its tokenizer gives the same ids. SFT: batch `SFT_BATCH` of our
tokenized rows of configs/tiny_cpu.yaml's SFT data. The first `--warmup` steps of each side are
dropped; the median of the rest is reported. Start-up is reported apart: ours from the stage call
to its first step (Ray's own start apart), TRL's from its process start to its first step.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "tiny_cpu.yaml"
PROMPTS = REPO / "rlhf" / "data" / "samples" / "prompts.jsonl"

LR = 2e-4
KL_COEF = 0.04
PROMPTS_PER_STEP = 8
SAMPLES_PER_PROMPT = 8
SFT_BATCH = 32
# Ours on one worker cuts each batch of 32, sorted by length, into micro-batches of at most this
# many padded tokens (`sft.micro_batch_tokens`; the same update, less padding). TRL pads the 32
# rows to the longest. Fastest of 256-2048 for both sizes in one process, 2026-12-02.
SFT_MICRO_BATCH_TOKENS = 1024
PROMPT_POOL = 512  # prompts both sides draw from (the first lines of PROMPTS)

# ~0.4M and ~25.6M parameters with the byte vocabulary (320 rows, untied embeddings).
SIZES = {
    "0.4M": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=256),
    "25M": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1376),
}


@dataclass(frozen=True)
class Job:
    kind: str  # "grpo" or "sft"
    size: str  # a key of SIZES
    max_new_tokens: int = 0  # GRPO: longest answer
    rollout: str = "vllm"  # GRPO: our rl.rollout.backend (TRL generates with transformers)

    @property
    def name(self) -> str:
        tokens = f"_{self.max_new_tokens}tok" if self.kind == "grpo" else ""
        return f"{self.kind}_{self.size}{tokens}"


JOBS = {
    j.name: j
    for j in (
        # Our rollout engine per job, the fastest for it (`rl.rollout.backend`; our GRPO stage
        # alone, 2026-12-02): transformers 0.095-0.113 vs vLLM 0.144-0.146 s a step at 0.4M;
        # 1.26 vs 1.43 s at 25.6M / 6 tokens; 5.76 vs 5.42 s at 25.6M / 48 tokens. Then, in the
        # policy's own actor vs the transformers actor: 0.4M 0.072-0.075 vs 0.088-0.092 s, 25.6M
        # / 6 tokens 0.93-0.94 vs 0.96-0.99 s; 25.6M / 48 tokens 4.66 vs vLLM's 4.42 s. Since
        # oneDNN matmuls and each prompt prefilled once (2026-12-03, alternating, 8 steps each):
        # 25.6M / 48 tokens in the policy's actor 3.81, 3.70 s vs vLLM 3.85, 3.91 s.
        Job("grpo", "0.4M", 6, rollout="policy"),
        Job("grpo", "25M", 6, rollout="policy"),
        Job("grpo", "25M", 48, rollout="policy"),
        Job("sft", "0.4M"),
        Job("sft", "25M"),
    )
}


# ---- the settings, on each side ---------------------------------------------------------------


def our_overrides(job: Job, model_dir: Path, root: Path, steps: int, num_workers: int) -> list[str]:
    """Overrides of configs/tiny_cpu.yaml: one stage from `model_dir`, the shared settings, no
    evaluation, no checkpoint before the last step, no monitor; resources stay the config's.
    `num_workers`: the SFT stage's data-parallel workers (they split the batch)."""
    run = [
        f"run.output_dir={root / 'ours'}",
        f"run.name={job.name}",
        f"run.stages=[{'rl' if job.kind == 'grpo' else 'sft'}]",
        f"model.path={model_dir}",
        "monitor.enabled=false",
    ]
    if job.kind == "sft":
        return run + [
            f"sft.max_steps={steps}",
            f"sft.num_workers={num_workers}",
            f"sft.global_batch_size={SFT_BATCH}",
            f"sft.micro_batch_size={SFT_BATCH // num_workers}",
            f"sft.micro_batch_tokens={SFT_MICRO_BATCH_TOKENS if num_workers == 1 else 'null'}",
            f"sft.lr={LR}",
            "sft.warmup_steps=0",
            "sft.min_lr_ratio=1.0",
            "sft.weight_decay=0.0",
            "sft.precision=fp32",
            "sft.eval_files=[]",
            "sft.select=last",
            f"sft.eval_interval={steps}",
            f"sft.save_interval={steps}",
            "sft.log_interval=1",
        ]
    batch = PROMPTS_PER_STEP * SAMPLES_PER_PROMPT
    return run + [
        "rl.algorithm=grpo",
        f"rl.prompt_files=[{{path: {root / 'prompts.jsonl'}}}]",
        "rl.eval_prompt_files=[]",
        f"rl.max_steps={steps}",
        f"rl.prompts_per_step={PROMPTS_PER_STEP}",
        f"rl.samples_per_prompt={SAMPLES_PER_PROMPT}",
        "rl.filter_groups=false",
        f"rl.mini_batch_size={batch}",
        "rl.ppo_epochs=1",
        "rl.loss_mode=token_mean",
        f"rl.kl_coef={KL_COEF}",
        "rl.kl_in_reward=false",
        "rl.kl_estimator=k3",
        "rl.kl_controller=fixed",
        f"rl.policy.lr={LR}",
        "rl.policy.warmup_steps=0",
        "rl.policy.min_lr_ratio=1.0",
        "rl.policy.weight_decay=0.0",
        "rl.policy.precision=fp32",
        "rl.reference.precision=fp32",
        f"rl.policy.micro_batch_size={batch}",
        f"rl.reference.micro_batch_size={batch}",
        f"rl.rollout.max_new_tokens={job.max_new_tokens}",
        f"rl.rollout.backend={job.rollout}",
        "rl.rollout.temperature=1.0",
        "rl.rollout.top_p=1.0",
        "rl.rollout.kv_cache_gb=1.0",
        "rl.reward.kind=rule",
        "rl.reward.rule=digit_match",
        f"rl.eval_interval={steps}",
        f"rl.save_interval={steps}",
    ]


def trl_spec(job: Job, cfg, model_dir: Path, data: Path, out_dir: Path) -> dict:
    """The job for rlhf/bench_trl.py, its settings read from our validated config `cfg`."""
    spec = dict(
        kind=job.kind,
        model_dir=str(model_dir),
        data=str(data),
        out_dir=str(out_dir),
        seed=cfg.run.seed,
    )
    if job.kind == "sft":
        s = cfg.sft
        return dict(
            spec,
            steps=s.max_steps,
            lr=s.lr,
            betas=list(s.betas),
            grad_clip=s.grad_clip,
            batch_size=s.global_batch_size,
            max_length=s.max_length,
        )
    rl = cfg.rl
    return dict(
        spec,
        steps=rl.max_steps,
        lr=rl.policy.lr,
        betas=list(rl.policy.betas),
        grad_clip=rl.policy.grad_clip,
        prompts_per_step=rl.prompts_per_step,
        samples_per_prompt=rl.samples_per_prompt,
        max_new_tokens=rl.rollout.max_new_tokens,
        temperature=rl.rollout.temperature,
        kl_coef=rl.kl_coef,
        clip_eps=rl.clip_eps_low,
    )


# ---- the data, written once for both sides -----------------------------------------------------


def write_prompt_pool(root: Path, count: int = PROMPT_POOL) -> Path:
    """The first `count` records of the bundled prompts: the file our RL stage reads."""
    lines = PROMPTS.read_text().splitlines(keepends=True)[:count]
    path = root / "prompts.jsonl"
    path.write_text("".join(lines))
    return path


def write_trl_prompts(cfg, model_dir: Path, out: Path) -> Path:
    """Our prompts as our RL stage renders them (text and token ids) with their labels."""
    from transformers import AutoTokenizer

    from rlhf.data.render import render_prompt, resolve_prompt_format
    from rlhf.data.stages import load_prompts

    rl = cfg.rl
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    items, report = load_prompts(rl.prompt_files, rl.on_error, rl.columns)
    fmt = resolve_prompt_format(rl.prompt_format, tok, report["message_lists"], "rl.prompt_format")
    with out.open("w") as f:
        for turns, label in items:
            ids = render_prompt(turns, tok, fmt)
            f.write(json.dumps({"prompt": tok.decode(ids), "prompt_ids": ids, "label": label}))
            f.write("\n")
    return out


def write_trl_sft_rows(cfg, model_dir: Path, out: Path) -> Path:
    """Our SFT stage's tokenized training rows (input_ids, labels with -100 on prompt tokens)."""
    from rlhf.train.tasks import TASKS

    train, _, _ = TASKS["sft"](cfg).prepare_data(cfg, str(model_dir))
    with out.open("w") as f:
        for row in train:
            f.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
    return out


# ---- running each side -------------------------------------------------------------------------


def run_ours(cfg, stage: str) -> dict:
    """One stage through the Python API on a fresh embedded Ray; per-step seconds from its
    metrics.jsonl, start-up (stage call to first step) and Ray's start apart."""
    from rlhf.api import Pipeline
    from rlhf.runtime import init_ray

    shutil.rmtree(cfg.run.dir, ignore_errors=True)
    t0 = time.time()
    init_ray(
        address=cfg.ray.address,
        num_cpus=cfg.ray.num_cpus,
        object_store_memory_gb=cfg.ray.object_store_memory_gb,
        dashboard=cfg.ray.dashboard,
    )
    t1 = time.time()
    pipeline = Pipeline(cfg)
    try:
        pipeline.run_stage(stage)
    finally:
        pipeline.close()
    return step_report(cfg.run.dir / stage / "metrics.jsonl", stage, t1) | {"ray_start_s": t1 - t0}


def step_report(metrics_file: Path, stage: str, called: float) -> dict:
    """Per-step seconds (`<stage>/timing/step` of each logged step, in order), the start-up from
    `called` (a time.time()) to the first step's start, and the RL phases' seconds per step."""
    key = f"{stage}/timing/step"
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steps = sorted((r for r in rows if key in r), key=lambda r: r["step"])
    if not steps:
        raise RuntimeError(f"{metrics_file}: no step rows with {key!r}")
    phases = {
        k.removeprefix(f"{stage}/timing/"): [r[k] for r in steps]
        for k in steps[0]
        if k.startswith(f"{stage}/timing/") and k != key
    }
    return {
        "step_s": [r[key] for r in steps],
        "startup_s": steps[0]["time"] - steps[0][key] - called,
        "phases": phases,
    }


def run_trl(
    python: str, spec: dict, workdir: Path, name: str, timeout_s: float, threads: int | None
) -> dict:
    """rlhf/bench_trl.py in the benchmark venv; its output goes to `<workdir>/trl_<name>.log`.
    `threads`: torch threads of the TRL process (None: torch's default, one per core)."""
    spec_file = workdir / f"trl_{name}.json"
    spec_file.write_text(json.dumps(spec, indent=1))
    log = workdir / f"trl_{name}.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(REPO)  # rlhf.bench_trl and the reward rule, from this checkout
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with log.open("w") as out:
        done = subprocess.run(
            [python, "-m", "rlhf.bench_trl", str(spec_file)],
            cwd=str(workdir),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
        )
    text = log.read_text(errors="replace")
    found = [line for line in text.splitlines() if line.startswith("TRL_RESULT ")]
    if done.returncode != 0 or not found:
        tail = "\n".join(text.splitlines()[-15:])
        raise RuntimeError(f"TRL exited with {done.returncode} (log {log}):\n{tail}")
    return json.loads(found[-1].removeprefix("TRL_RESULT "))


def median_after(values: list[float], warmup: int) -> float:
    """Median of `values` without the first `warmup` (all of them when nothing would be left)."""
    kept = values[warmup:] or values
    return statistics.median(kept)


# ---- one job ----------------------------------------------------------------------------------


def _params(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())


def run_job(
    job: Job,
    root: Path,
    python: str,
    steps: int,
    warmup: int,
    timeout_s: float,
    trl_threads: int | None = None,
) -> dict:
    """Both sides of one job; a side that fails is reported with its error, not raised."""
    import transformers

    from rlhf.config import load_config
    from rlhf.models.factory import ensure_tiny_model

    model_dir = ensure_tiny_model(root / "models" / job.size, seed=0, **SIZES[job.size])
    write_prompt_pool(root)
    workers = load_config(DEMO_CONFIG, ["run.stages=[]"]).sft.num_workers
    cfg = load_config(DEMO_CONFIG, our_overrides(job, model_dir, root, steps, workers))
    if job.kind == "grpo":
        data = write_trl_prompts(cfg, model_dir, root / "prompts_trl.jsonl")
    else:
        data = write_trl_sft_rows(cfg, model_dir, root / "sft_trl.jsonl")
    spec = trl_spec(job, cfg, model_dir, data, root / "trl" / job.name)
    result = {
        "job": job.name,
        "params_M": round(_params(model_dir) / 1e6, 2),
        **({"max_new_tokens": job.max_new_tokens} if job.kind == "grpo" else {}),
        **({"ours_rollout_backend": job.rollout} if job.kind == "grpo" else {}),
        "batch": SFT_BATCH if job.kind == "sft" else f"{PROMPTS_PER_STEP}x{SAMPLES_PER_PROMPT}",
        **({"ours_micro_batch_tokens": cfg.sft.micro_batch_tokens} if job.kind == "sft" else {}),
        "steps": steps,
        "warmup_steps_dropped": warmup,
    }
    load = {"start": os.getloadavg()[0]}
    try:
        trl = run_trl(python, spec, root, job.name, timeout_s, trl_threads)
        result.update(
            trl_step_s=round(median_after(trl["step_s"], warmup), 4),
            trl_startup_s=round(trl["startup_s"], 1),
            trl_torch_threads=trl["torch_threads"],
            trl_versions=trl["versions"],
        )
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        result["trl_error"] = str(exc)
    load["before_ours"] = os.getloadavg()[0]
    try:
        ours = run_ours(cfg, "rl" if job.kind == "grpo" else "sft")
        result.update(
            ours_step_s=round(median_after(ours["step_s"], warmup), 4),
            ours_startup_s=round(ours["startup_s"], 1),
            ours_ray_start_s=round(ours["ray_start_s"], 1),
        )
        if ours["phases"]:
            result["ours_phases_s"] = {
                k: round(median_after(v, warmup), 4) for k, v in sorted(ours["phases"].items())
            }
    except Exception as exc:  # a failing stage is a result of the benchmark, not its end
        result["ours_error"] = f"{type(exc).__name__}: {exc}"
    if "trl_step_s" in result and "ours_step_s" in result:
        result["trl_over_ours"] = round(result["trl_step_s"] / result["ours_step_s"], 2)
    result["ours_transformers"] = transformers.__version__
    load["end"] = os.getloadavg()[0]
    # A busy machine slows a process of two torch threads far more than actors of one thread
    # each (a thread waits at every barrier for its descheduled sibling): compare on an idle one.
    result["load_avg_1m"] = {k: round(v, 2) for k, v in load.items()}
    return result
