"""The transformers rollout engine samples as the rollout contract says (`actors/hf_rollout.py`):
prompt-major order, stop at EOS, the sampled distribution's log-probabilities, seeded
reproducibility, and weights pushed in place."""

import pytest
import torch

from actors.hf_rollout import HFRolloutEngine
from rlhf.models.factory import load_causal_lm

# Chat-shaped prompts of different lengths: <|user|> bytes <|eos|> <|assistant|>.
PROMPTS = [[2, *(5 + b for b in text.encode()), 1, 4] for text in ("hi", "2+2?", "abc", "héllo!")]
EOS = 1


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return HFRolloutEngine(tiny_dir)


def _model(tiny_dir):
    return load_causal_lm(tiny_dir).eval()


@torch.no_grad()
def _logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    """log p(token | prefix) of each token, teacher-forced, at `temperature` (no top-p)."""
    ids = torch.tensor([prompt + tokens])
    logits = model(ids).logits[0, len(prompt) - 1 : -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def test_greedy_answers_and_logprobs_are_the_models(engine, tiny_dir):
    samples = engine.generate(PROMPTS, max_tokens=12, temperature=0.0, ignore_eos=True)
    model = _model(tiny_dir)
    assert [s.prompt_index for s in samples] == [0, 1, 2, 3]
    for prompt, sample in zip(PROMPTS, samples):
        ids = torch.tensor([prompt])
        model.generation_config.eos_token_id = None
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12)
        assert sample.token_ids == want[0, len(prompt) :].tolist()  # alone, unpadded
        assert sample.finish_reason == "length" and len(sample.token_ids) == 12
        got = torch.tensor(sample.logprobs)
        torch.testing.assert_close(
            got, _logprobs(model, prompt, sample.token_ids, 1.0), atol=1e-4, rtol=0
        )


def test_samples_stop_at_eos_and_carry_the_sampled_distributions_logprobs(engine, tiny_dir):
    temperature, n = 1.7, 6
    samples = engine.generate(PROMPTS, n=n, max_tokens=10, temperature=temperature, seed=3)
    assert [s.prompt_index for s in samples] == [i for i in range(len(PROMPTS)) for _ in range(n)]
    model = _model(tiny_dir)
    for s in samples:
        stopped = EOS in s.token_ids
        assert s.finish_reason == ("stop" if stopped else "length")
        assert EOS not in s.token_ids[:-1] and (stopped or len(s.token_ids) == 10)
        want = _logprobs(model, PROMPTS[s.prompt_index], s.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-4, rtol=0)
    assert len({tuple(s.token_ids) for s in samples}) > len(PROMPTS)  # the samples differ
    again = engine.generate(PROMPTS, n=n, max_tokens=10, temperature=temperature, seed=3)
    assert [s.token_ids for s in again] == [s.token_ids for s in samples]
    other = engine.generate(PROMPTS, n=n, max_tokens=10, temperature=temperature, seed=4)
    assert [s.token_ids for s in other] != [s.token_ids for s in samples]


def test_top_p_keeps_the_sampled_tokens_inside_the_nucleus(engine, tiny_dir):
    samples = engine.generate(PROMPTS[:1], n=16, max_tokens=1, temperature=1.0, top_p=0.3, seed=0)
    model = _model(tiny_dir)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([PROMPTS[0]])).logits[0, -1], -1)
    ranked = torch.sort(probs, descending=True)
    keep = int((torch.cumsum(ranked.values, 0) < 0.3).sum()) + 1
    nucleus = set(ranked.indices[:keep].tolist())
    assert {s.token_ids[0] for s in samples} <= nucleus
    for s in samples:  # renormalised over the nucleus
        want = torch.log(probs[s.token_ids[0]] / ranked.values[:keep].sum())
        assert s.logprobs[0] == pytest.approx(float(want), abs=1e-4)


def test_weights_pushed_in_place_are_the_ones_it_samples_with(engine, tiny_dir):
    model = _model(tiny_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    before = engine.generate(PROMPTS, max_tokens=8, temperature=0.0, ignore_eos=True)
    version = engine.update_weights(model.state_dict().items(), version=7)
    after = engine.generate(PROMPTS, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert version == 7 and all(s.weights_version == 7 for s in after)
    assert [s.token_ids for s in after] != [s.token_ids for s in before]
    for prompt, sample in zip(PROMPTS, after):
        want = _logprobs(model, prompt, sample.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(sample.logprobs), want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="the model has no"):
        engine.update_weights([("no.such.weight", torch.zeros(1))])
    engine.update_weights(_model(tiny_dir).state_dict().items(), version=8)  # as loaded


def test_an_engine_around_a_training_module_samples_from_it_and_leaves_it_as_it_was(
    engine, tiny_dir
):
    """`HFRolloutEngine.around` (rollout.backend='policy'): the same samples as an engine that
    loaded the same weights, and the module keeps its training mode and generation config (a
    checkpoint saved later writes that config)."""
    model = load_causal_lm(tiny_dir).train()
    model.generation_config.top_k = 50  # a default that must not leak into sampling
    around = HFRolloutEngine.around(model)
    for temperature, seed, n in ((0.0, None, 1), (1.3, 11, 3)):
        got = around.generate(PROMPTS, n=n, max_tokens=8, temperature=temperature, seed=seed)
        want = engine.generate(PROMPTS, n=n, max_tokens=8, temperature=temperature, seed=seed)
        assert [s.token_ids for s in got] == [s.token_ids for s in want]
        for a, b in zip(got, want):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs))
    assert model.training and model.generation_config.top_k == 50
    with torch.no_grad():  # no copy: what the module holds now is what it samples with
        model.lm_head.weight.zero_()  # every logit 0: a uniform distribution
    (sample,) = around.generate(PROMPTS[:1], max_tokens=3, temperature=1.0, ignore_eos=True)
    uniform = -torch.log(torch.tensor(float(model.config.vocab_size)))
    torch.testing.assert_close(torch.tensor(sample.logprobs), uniform.expand(3))


def test_each_prompt_is_computed_once_for_all_its_samples(engine, tiny_dir):
    """The prompts but their last token run once each and their keys and values serve every
    sample; the samples match teacher-forced logprobs, one-token prompts included."""
    tokens = []
    hook = engine.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: tokens.append(args[0].numel())
    )
    try:
        n, steps = 5, 6
        samples = engine.generate(
            PROMPTS, n=n, max_tokens=steps, temperature=1.0, seed=0, ignore_eos=True
        )
        width = max(map(len, PROMPTS))
        # distinct prompts x (width - 1), then every row one token a step (the first: the
        # prompt's last token).
        assert sum(tokens) == len(PROMPTS) * (width - 1) + len(PROMPTS) * n * steps
        tokens.clear()
        short = {
            tuple(map(tuple, prompts)): engine.generate(prompts, n=3, max_tokens=4, seed=0)
            for prompts in ([[2]], [[2], [2, 7]])  # nothing before the last token; padding
        }
    finally:
        hook.remove()
    model = _model(tiny_dir)
    for s in samples:
        want = _logprobs(model, PROMPTS[s.prompt_index], s.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-4, rtol=0)
    for prompts, got in short.items():
        assert len(got) == 3 * len(prompts)
        for s in got:
            want = _logprobs(model, list(prompts[s.prompt_index]), s.token_ids, 1.0)
            torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-4, rtol=0)
