import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from rlhf.models.tokenizer import build_byte_tokenizer

    path = tmp_path_factory.mktemp("tok")
    build_byte_tokenizer().save_pretrained(str(path))
    return str(path)
