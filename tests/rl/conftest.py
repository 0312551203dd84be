import pytest

from rlhf.models.factory import ensure_tiny_model

# Head size 32 (64 / 2): the smallest vLLM's CPU attention accepts.
TINY = dict(
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    intermediate_size=64,
    max_position_embeddings=256,
)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.mktemp("rl_models") / "tiny", seed=0, **TINY)
