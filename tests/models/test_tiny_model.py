"""The tiny Llama factory: determinism, what is saved, atomic writes, and checkpoint loading."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig

from rlhf.models import factory
from rlhf.models.factory import build_tiny_model, ensure_tiny_model, load_causal_lm
from rlhf.models.tokenizer import build_byte_tokenizer


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tiny_size):
    same = build_tiny_model(seed=3, **tiny_size), build_tiny_model(seed=3, **tiny_size)
    assert _same_weights(*same)
    assert not _same_weights(build_tiny_model(seed=4, **tiny_size), same[0])


def test_building_a_model_leaves_the_global_rng_alone(tiny_size):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(seed=0, **tiny_size)
    assert torch.equal(torch.rand(3), expected)


def test_vocab_is_padded_to_a_multiple_of_64_and_special_ids_are_the_tokenizers(tiny_dir):
    tok = build_byte_tokenizer()  # 261 tokens -> 320 embedding rows
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["vocab_size"] == 320
    assert (config["pad_token_id"], config["eos_token_id"]) == (tok.pad_token_id, tok.eos_token_id)
    gen = GenerationConfig.from_pretrained(tiny_dir)
    assert (gen.pad_token_id, gen.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    saved = AutoTokenizer.from_pretrained(tiny_dir)
    assert saved("héllo <|eos|>")["input_ids"] == tok("héllo <|eos|>")["input_ids"]


def test_checkpoint_is_safetensors_and_reloads_with_the_built_weights(tiny_dir, tiny_size):
    assert (tiny_dir / "model.safetensors").is_file()
    assert not list(tiny_dir.glob("*.bin"))
    tensors = load_file(tiny_dir / "model.safetensors")
    assert tensors["lm_head.weight"].shape == (320, tiny_size["hidden_size"])
    model = load_causal_lm(tiny_dir)
    assert model.dtype == torch.float32  # the CPU default
    assert _same_weights(model, build_tiny_model(seed=0, **tiny_size))


def test_ensure_tiny_model_reuses_the_model_and_rejects_other_arguments(tiny_dir, tiny_size):
    before = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tiny_dir, seed=0, **tiny_size) == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="seed"):
        ensure_tiny_model(tiny_dir, seed=1, **tiny_size)
    with pytest.raises(ValueError, match="hidden_size"):
        ensure_tiny_model(tiny_dir, seed=0, **{**tiny_size, "hidden_size": 32})
    # Leaving an argument out means its default, which this model was not built with.
    with pytest.raises(ValueError, match="num_layers"):
        ensure_tiny_model(
            tiny_dir, seed=0, **{k: v for k, v in tiny_size.items() if k != "num_layers"}
        )


def test_a_failed_write_leaves_neither_the_model_nor_temporary_files(
    tmp_path, monkeypatch, tiny_size
):
    def write_half_then_fail(out, seed, size):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(factory, "_write_tiny_model", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ensure_tiny_model(tmp_path / "tiny", **tiny_size)
    assert list(tmp_path.iterdir()) == []


def test_loading_a_folder_that_is_no_checkpoint_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        load_causal_lm(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_causal_lm(tmp_path)


def test_checkpoint_code_never_runs_unless_trust_remote_code_is_passed(tmp_path):
    marker = tmp_path / "code_ran"
    (tmp_path / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"},
            }
        )
    )
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_causal_lm(tmp_path)
    assert not marker.exists()


def test_head_sizes_that_vllm_cannot_run_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="head size"):
        ensure_tiny_model(tmp_path / "tiny", hidden_size=64, num_heads=4, num_kv_heads=4)
    assert list(tmp_path.iterdir()) == []
