"""A saved tiny checkpoint runs in vLLM exactly as in transformers, before and after a weight push.

One engine for the whole module (vLLM startup on CPU: ~10 s with the import). Exact token ids are
compared, so the random model needs no training: fp32 on both sides makes ties vanishingly rare.
The first test sees the weights loaded from disk; every later test pushes the weights it needs.
"""

import time

import pytest
import torch

from rlhf.models.factory import load_causal_lm
from rlhf.runtime import is_loopback, listening_sockets

pytestmark = pytest.mark.vllm

# Chat-shaped prompts of different lengths: <|user|> bytes <|eos|> <|assistant|>.
PROMPTS = [[2, *(5 + b for b in text.encode()), 1, 4] for text in ("hi", "2+2?", "abc", "héllo!")]
NEW_TOKENS = 16
# Longer than one KV block (128 tokens on CPU): only full blocks enter the prefix cache, and a
# stale cached prefix after a weight push is the bug the second test would catch.
LONG_PROMPT = [2, *(5 + (7 * i) % 256 for i in range(150)), 1, 4]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    from actors.rollout import RolloutEngine

    started = time.perf_counter()
    engine = RolloutEngine(tiny_dir, max_model_len=256, kv_cache_gb=0.0625, max_num_seqs=16)
    print(f"\nvLLM engine: {time.perf_counter() - started:.1f}s incl. import")
    yield engine
    engine.shutdown()


@torch.no_grad()
def _hf_greedy(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """transformers `generate`, greedy, EOS treated as an ordinary token; plus each logprob."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
    )
    new = out[0, len(prompt) :]
    logits = model(out).logits[0, len(prompt) - 1 : -1]
    return new.tolist(), torch.log_softmax(logits, -1).gather(-1, new[:, None]).squeeze(-1)


def _reference(tiny_dir):
    model = load_causal_lm(tiny_dir).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: never stop early
    return model


def test_vllm_greedy_tokens_and_logprobs_match_transformers_generate(engine, tiny_dir):
    samples = engine.generate(PROMPTS, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    model = _reference(tiny_dir)
    for prompt, sample in zip(PROMPTS, samples):
        tokens, logprobs = _hf_greedy(model, prompt)
        assert sample.token_ids == tokens
        torch.testing.assert_close(torch.tensor(sample.logprobs), logprobs, atol=1e-4, rtol=0)
    assert len({t for s in samples for t in s.token_ids}) > 4, "degenerate model output"


def test_weights_pushed_in_place_make_vllm_follow_the_new_weights(engine, tiny_dir):
    prompts = [*PROMPTS, LONG_PROMPT]
    before = engine.generate(prompts, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    model = _reference(tiny_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    version = engine.update_weights(model.state_dict().items())
    after = engine.generate(prompts, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    assert [s.token_ids for s in after] != [s.token_ids for s in before]
    assert all(s.weights_version == version == before[0].weights_version + 1 for s in after)
    for prompt, sample in zip(prompts, after):
        assert sample.token_ids == _hf_greedy(model, prompt)[0]


def test_a_push_that_splits_a_fused_projection_group_is_refused(engine, tiny_dir):
    state = _reference(tiny_dir).state_dict()
    q_only = [(n, t) for n, t in state.items() if ".q_proj." in n]
    with pytest.raises(ValueError, match="k_proj"):
        engine.update_weights(q_only)


def test_generation_stops_at_eos_unless_told_to_ignore_it(engine, tiny_dir):
    """Swap the EOS row of the output layer with the greedy first token's row: EOS comes first."""
    model = _reference(tiny_dir)
    first = _hf_greedy(model, PROMPTS[0])[0][0]
    eos = model.config.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[[first, eos]] = model.lm_head.weight[[eos, first]]
    engine.update_weights(model.state_dict().items())
    stopped, ignored = (
        engine.generate(PROMPTS[:1], max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=flag)[0]
        for flag in (False, True)
    )
    assert (stopped.token_ids, stopped.finish_reason) == ([eos], "stop")
    assert ignored.token_ids[0] == eos and len(ignored.token_ids) == NEW_TOKENS
    assert ignored.finish_reason == "length"


def test_seeded_sampling_repeats_exactly_and_draws_independently_per_prompt(engine):
    same_prompt_twice = [PROMPTS[0], PROMPTS[0]]
    first = engine.generate(same_prompt_twice, n=3, max_tokens=8, temperature=1.0, seed=11)
    again = engine.generate(same_prompt_twice, n=3, max_tokens=8, temperature=1.0, seed=11)
    assert [s.token_ids for s in first] == [s.token_ids for s in again]
    assert [s.prompt_index for s in first] == [0, 0, 0, 1, 1, 1]
    assert all(len(s.token_ids) == len(s.logprobs) == 8 for s in first)
    # Identical prompts, so only the seeds tell the two requests apart.
    assert [s.token_ids for s in first[:3]] != [s.token_ids for s in first[3:]]


def test_vllm_engine_listens_only_on_loopback(engine):
    exposed = [s for s in listening_sockets() if not is_loopback(s[2])]
    assert exposed == []
