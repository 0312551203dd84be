"""LoRA through PEFT: what trains, and merged weights that reproduce the adapted model."""

import torch

from rlhf.models.factory import (
    apply_lora,
    load_causal_lm,
    load_reward_model,
    merge_lora,
    sequence_rewards,
)

LORA = dict(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
IDS = torch.tensor([[7, 8, 9, 10, 11, 1], [40, 41, 42, 43, 44, 1]])


def _trainable(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _perturb_trainable(model: torch.nn.Module) -> None:
    """LoRA B starts at zero, so a fresh adapter is a no-op; give every trainable tensor noise."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_only_lora_parameters_train_on_a_causal_lm(tiny_dir):
    model = apply_lora(load_causal_lm(tiny_dir), **LORA)
    names = _trainable(model)
    # 2 layers x 3 target modules x (A, B)
    assert len(names) == 12
    assert all(".lora_A." in n or ".lora_B." in n for n in names)


def test_reward_model_with_lora_trains_its_new_score_head_too(tiny_dir):
    model = apply_lora(load_reward_model(tiny_dir), **LORA)
    others = [n for n in _trainable(model) if ".lora_" not in n]
    assert others == ["base_model.model.score.modules_to_save.default.weight"]


@torch.no_grad()
def test_merged_causal_lm_gives_the_logits_of_the_adapted_model(tiny_dir):
    model = apply_lora(load_causal_lm(tiny_dir), **LORA).eval()
    _perturb_trainable(model)
    adapted = model(input_ids=IDS).logits
    base = load_causal_lm(tiny_dir)(input_ids=IDS).logits
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapters do something
    merged = merge_lora(model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n in merged.state_dict())
    torch.testing.assert_close(merged(input_ids=IDS).logits, adapted, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_merged_reward_model_gives_the_rewards_of_the_adapted_model(tiny_dir, tmp_path):
    model = apply_lora(load_reward_model(tiny_dir), **LORA).eval()
    _perturb_trainable(model)
    mask = torch.ones_like(IDS)
    adapted = sequence_rewards(model, IDS, mask)
    merged = merge_lora(model)
    merged.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = load_reward_model(tmp_path).eval()
    torch.testing.assert_close(sequence_rewards(reloaded, IDS, mask), adapted, atol=1e-5, rtol=1e-5)
