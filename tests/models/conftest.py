"""One tiny checkpoint for every model test: small enough that each forward pass is instant."""

import pytest

from rlhf.models.factory import ensure_tiny_model

# GQA on purpose (2 query heads share 1 key/value head): the case loaders most often get wrong.
# Head size 32 is the smallest vLLM's CPU attention accepts.
TINY = dict(
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=128,
    max_position_embeddings=256,
)


@pytest.fixture(scope="session")
def tiny_size() -> dict:
    return dict(TINY)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0, **TINY)
