"""What each offline stage plugs into the shared loop: data, model, loss, evaluation, export.

`TASKS = {"pretrain": ..., "sft": ..., "rm": ..., "dpo": ...}` maps a stage name to a `StageTask`,
a bundle of plain functions; `rlhf/train/loop.py` calls them. Losses come from
`rlhf.algorithms` and are returned already divided by the global normaliser (`norm`: tokens for
language modelling, pairs for preferences), so summing micro-batch losses over every rank gives the
global-batch mean.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rlhf.algorithms import PREFERENCE_LOSSES, reward_pairwise_loss, token_logprobs
from rlhf.config import Config


@dataclass(frozen=True)
class StageTask:
    prepare_data: Callable[[Config, str], tuple[Any, Any, dict]]  # driver: (train, eval, report)
    build_model: Callable[[Config, str], torch.nn.Module]
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    length: Callable[[dict], int]  # the width `collate` pads a row's batch to, at least
    loss_weight: Callable[[list[dict]], int]  # the normaliser of a global batch
    loss: Callable[[torch.nn.Module, dict, int], tuple[torch.Tensor, dict[str, float]]]
    eval_sums: Callable[[torch.nn.Module, dict], dict[str, float]]
    eval_keys: tuple[str, ...]
    finish_eval: Callable[[dict[str, float]], dict[str, float]]
    finish_train: Callable[[dict[str, float]], dict[str, float]]
    export: Callable[[torch.nn.Module, dict | None, str, Path], None]


# ---- shared pieces -----------------------------------------------------------------------------


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def _lm_collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    input_ids = _pad([r["input_ids"] for r in rows], 0)
    labels = _pad([r.get("labels", r["input_ids"]) for r in rows], -100)
    attention_mask = _pad([[1] * len(r["input_ids"]) for r in rows], 0)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _lm_length(row: dict) -> int:
    return len(row["input_ids"])


def _lm_weight(rows: list[dict]) -> int:
    """Tokens that carry loss: every label after the first position that is not -100."""
    return sum(sum(1 for t in r.get("labels", r["input_ids"])[1:] if t != -100) for r in rows)


def _lm_nll(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and the count of loss tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logprobs = token_logprobs(logits[:, :-1].float(), labels.clamp(min=0))
    return -(logprobs * mask).sum(), mask.sum()


def _lm_loss(model, batch, norm):
    nll, count = _lm_nll(model, batch)
    return nll / norm, {"tokens": float(count)}


def _lm_eval(model, batch):
    nll, count = _lm_nll(model, batch)
    return {"nll": nll.item(), "tokens": count.item()}


def _lm_finish_eval(sums):
    loss = sums["nll"] / max(1.0, sums["tokens"])
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


def _lm_finish_train(sums):
    return {"loss": sums["loss"], "tokens": sums["tokens"]}


def _load_causal_lm(cfg: Config, path: str, lora: Any = None) -> torch.nn.Module:
    from rlhf.models.factory import load_trainable_lm

    return load_trainable_lm(path, trust_remote_code=cfg.model.trust_remote_code, lora=lora)


def _export_hf(module: torch.nn.Module, weights: dict | None, init_dir: str, out: Path) -> None:
    """Save a plain HF checkpoint (LoRA merged) + the tokenizer, as safetensors."""
    from transformers import AutoTokenizer

    from rlhf.models.factory import merge_lora

    model = getattr(module, "policy", module)
    if hasattr(model, "peft_config"):
        model = merge_lora(copy.deepcopy(model))  # merging is in place; training goes on
        weights = None
    elif weights is not None and hasattr(module, "policy"):
        weights = {k[len("policy.") :]: v for k, v in weights.items() if k.startswith("policy.")}
    model.save_pretrained(str(out), state_dict=weights, safe_serialization=True)
    AutoTokenizer.from_pretrained(init_dir).save_pretrained(str(out))


# ---- stages ------------------------------------------------------------------------------------


def _prepare_pretrain(cfg: Config, init_dir: str):
    from rlhf.data.pretrain import build_pretraining_data

    return build_pretraining_data(cfg.pretrain, init_dir, seed=cfg.run.seed)


def _prepare_sft(cfg: Config, init_dir: str):
    from rlhf.data.stages import prepare_sft

    return prepare_sft(cfg.sft, init_dir, seed=cfg.run.seed)


def _prepare_preferences(stage: str) -> Callable[[Config, str], tuple[Any, Any, dict]]:
    def prepare(cfg: Config, init_dir: str):
        from rlhf.data.stages import prepare_preferences

        return prepare_preferences(getattr(cfg, stage), init_dir, seed=cfg.run.seed, stage=stage)

    return prepare


def _pair_collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one padded batch: (2B, T)."""
    seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
    labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
    return {
        "input_ids": _pad(seqs, 0),
        "labels": _pad(labels, -100),
        "attention_mask": _pad([[1] * len(s) for s in seqs], 0),
    }


def _pair_length(row: dict) -> int:
    return max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))


def _rewards(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from rlhf.models.factory import sequence_rewards

    scores = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def _build_rm(cfg: Config, init_dir: str) -> torch.nn.Module:
    from rlhf.models.factory import load_reward_model, with_lora

    model = load_reward_model(
        init_dir, trust_remote_code=cfg.model.trust_remote_code, seed=cfg.run.seed
    )
    return with_lora(model, cfg.rm.lora)


def _rm_loss_fn(margin: float):
    def loss(model, batch, norm):
        chosen, rejected = _rewards(model, batch)
        value, metrics = reward_pairwise_loss(chosen, rejected, margin=margin, reduction="sum")
        return value / norm, {
            "pairs": float(chosen.numel()),
            "correct": float((chosen > rejected).sum()),
        }

    return loss


def _rm_eval(model, batch):
    chosen, rejected = _rewards(model, batch)
    loss = -F.logsigmoid(chosen - rejected)
    return {
        "pairs": chosen.numel(),
        "correct": (chosen > rejected).sum().item(),
        "nll": loss.sum().item(),
        "margin": (chosen - rejected).sum().item(),
    }


def _pair_finish_eval(sums):
    pairs = max(1.0, sums["pairs"])
    return {
        "accuracy": sums["correct"] / pairs,
        "loss": sums["nll"] / pairs,
        "margin": sums["margin"] / pairs,
    }


def _pair_finish_train(sums):
    return {"loss": sums["loss"], "accuracy": sums["correct"] / max(1.0, sums["pairs"])}


class PolicyWithReference(torch.nn.Module):
    """DPO's policy and its frozen reference in one module, so one DeepSpeed engine holds both
    (without dpo.precompute_reference; with it the engine holds the policy alone)."""

    def __init__(self, policy: torch.nn.Module, reference: torch.nn.Module) -> None:
        super().__init__()
        self.policy, self.reference = policy, reference
        self.reference.requires_grad_(False)
        self.reference.eval()


def _build_dpo(cfg: Config, init_dir: str) -> torch.nn.Module:
    policy = _load_causal_lm(cfg, init_dir, cfg.dpo.lora)
    if cfg.dpo.precompute_reference:  # the reference's logprobs come with the data
        return policy
    return PolicyWithReference(policy, _load_causal_lm(cfg, init_dir))


def _prepare_dpo(cfg: Config, init_dir: str) -> tuple[Any, Any, dict]:
    """The preference rows; with dpo.precompute_reference each row also gets the frozen
    reference's summed response logprobs (`ref_chosen_logp`, `ref_rejected_logp`), computed here
    once, in the driver (on its GPU when the stage trains on GPUs and the driver has one), and
    saved with the data, so the workers neither hold nor run the reference."""
    import time

    train, evals, report = _prepare_preferences("dpo")(cfg, init_dir)
    if not cfg.dpo.precompute_reference:
        return train, evals, report
    from rlhf import engine as eng

    t0 = time.perf_counter()
    on_gpu = cfg.dpo.use_gpu and torch.cuda.is_available()
    dtype = eng.precision_dtype(cfg.dpo.precision, on_gpu)
    reference = _load_causal_lm(cfg, init_dir).to("cuda" if on_gpu else "cpu", dtype).eval()
    train, evals = (
        _with_reference_logprobs(reference, ds, cfg.dpo.micro_batch_size) for ds in (train, evals)
    )
    report["reference_logprobs"] = {
        "precomputed": True,
        "seconds": round(time.perf_counter() - t0, 2),
        "dtype": str(dtype).removeprefix("torch."),
    }
    return train, evals, report


@torch.no_grad()
def _reference_logprobs(reference: torch.nn.Module, rows: list[dict]) -> torch.Tensor:
    """The reference's summed response logprobs of each pair's chosen and rejected answers,
    (N, 2), as the live reference computes them in `_dpo_terms`."""
    device = next(reference.parameters()).device
    batch = {k: v.to(device) for k, v in _pair_collate(rows).items()}
    logps, _ = _seq_logprobs(reference, batch)
    return torch.stack(logps.float().cpu().chunk(2), dim=1)


def _with_reference_logprobs(reference: torch.nn.Module, ds: Any, batch_size: int) -> Any:
    if len(ds) == 0:
        return ds
    parts = [
        _reference_logprobs(reference, [ds[j] for j in range(i, min(i + batch_size, len(ds)))])
        for i in range(0, len(ds), batch_size)
    ]
    table = torch.cat(parts)
    ds = ds.add_column("ref_chosen_logp", table[:, 0].tolist())
    return ds.add_column("ref_rejected_logp", table[:, 1].tolist())


def _dpo_collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """`_pair_collate`, plus the precomputed reference logprobs (2B,) when the rows carry them."""
    batch = _pair_collate(rows)
    if "ref_chosen_logp" in rows[0]:
        batch["ref_logps"] = torch.tensor(
            [r["ref_chosen_logp"] for r in rows] + [r["ref_rejected_logp"] for r in rows],
            dtype=torch.float32,
        )
    return batch


def _seq_logprobs(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response logprobs per sequence (2B,) and response token counts (2B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logprobs = token_logprobs(logits[:, :-1].float(), labels.clamp(min=0))
    return (logprobs * mask).sum(-1), mask.sum(-1)


def _dpo_terms(module: torch.nn.Module, batch: dict, loss_name: str, dcfg: Any):
    """The preference loss of the policy against the live reference (a `PolicyWithReference`)
    or against the logprobs precomputed with the data (a plain policy)."""
    if isinstance(module, PolicyWithReference):
        logps, counts = _seq_logprobs(module.policy, batch)
        with torch.no_grad():
            ref_logps, _ = _seq_logprobs(module.reference, batch)
    elif "ref_logps" in batch:
        logps, counts = _seq_logprobs(module, batch)
        ref_logps = batch["ref_logps"].to(logps.device)
    else:
        raise ValueError(
            "dpo.precompute_reference=true, but the prepared data carry no reference logprobs "
            "(they were prepared without it): delete <run dir>/dpo/data to prepare them again"
        )
    half = logps.shape[0] // 2
    return PREFERENCE_LOSSES[loss_name](
        logps[:half],
        logps[half:],
        ref_logps[:half],
        ref_logps[half:],
        beta=dcfg.beta,
        label_smoothing=dcfg.label_smoothing,
        nll_coef=dcfg.nll_coef,
        chosen_lengths=counts[:half],
        reduction="sum",
    )


def _dpo_loss_fn(dcfg: Any):
    def loss(module, batch, norm):
        value, metrics = _dpo_terms(module, batch, dcfg.loss, dcfg)
        pairs = batch["input_ids"].shape[0] // 2
        return value / norm, {
            "pairs": float(pairs),
            "correct": float(metrics["dpo/reward_accuracy"]) * pairs,
        }

    return loss


def _dpo_eval_fn(dcfg: Any):
    def eval_sums(module, batch):
        value, metrics = _dpo_terms(module, batch, dcfg.loss, dcfg)
        pairs = batch["input_ids"].shape[0] // 2
        return {
            "pairs": pairs,
            "nll": value.item(),
            "correct": float(metrics["dpo/reward_accuracy"]) * pairs,
            "margin": float(metrics["dpo/reward_margin"]) * pairs,
        }

    return eval_sums


# ---- the table ---------------------------------------------------------------------------------

_LM = dict(
    collate=_lm_collate,
    length=_lm_length,
    loss_weight=_lm_weight,
    loss=_lm_loss,
    eval_sums=_lm_eval,
    eval_keys=("nll", "tokens"),
    finish_eval=_lm_finish_eval,
    finish_train=_lm_finish_train,
    export=_export_hf,
)
_PAIRS = dict(
    collate=_pair_collate,
    length=_pair_length,
    loss_weight=len,
    eval_keys=("pairs", "correct", "nll", "margin"),
    finish_eval=_pair_finish_eval,
    finish_train=_pair_finish_train,
)


def _pretrain_task(cfg: Config) -> StageTask:
    return StageTask(
        prepare_data=_prepare_pretrain, build_model=lambda c, path: _load_causal_lm(c, path), **_LM
    )


def _sft_task(cfg: Config) -> StageTask:
    return StageTask(
        prepare_data=_prepare_sft,
        build_model=lambda c, path: _load_causal_lm(c, path, c.sft.lora),
        **_LM,
    )


def _rm_task(cfg: Config) -> StageTask:
    return StageTask(
        prepare_data=_prepare_preferences("rm"),
        build_model=_build_rm,
        loss=_rm_loss_fn(cfg.rm.margin),
        eval_sums=_rm_eval,
        export=_export_hf,
        **_PAIRS,
    )


def _dpo_task(cfg: Config) -> StageTask:
    return StageTask(
        prepare_data=_prepare_dpo,
        build_model=_build_dpo,
        loss=_dpo_loss_fn(cfg.dpo),
        eval_sums=_dpo_eval_fn(cfg.dpo),
        export=_export_hf,
        **{**_PAIRS, "collate": _dpo_collate},
    )


TASKS: dict[str, Callable[[Config], StageTask]] = {
    "pretrain": _pretrain_task,
    "sft": _sft_task,
    "rm": _rm_task,
    "dpo": _dpo_task,
}
