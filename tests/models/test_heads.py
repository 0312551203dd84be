"""Reward model and critic: stock HF heads on the tiny backbone, read at the right tokens."""

import pytest
import torch

from rlhf.models.factory import (
    load_causal_lm,
    load_critic,
    load_reward_model,
    sequence_rewards,
    token_values,
)

PAD = 0  # the byte tokenizer's pad id
# Two sequences of different lengths: real tokens are byte ids (5..260), the last one is EOS (1).
SHORT, LONG = [7, 8, 9, 1], [40, 41, 42, 43, 44, 1]


def _right_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([s + [PAD] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


def _left_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([[PAD] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


@torch.no_grad()
def test_padding_does_not_change_the_reward_because_it_is_read_at_the_last_real_token(tiny_dir):
    rm = load_reward_model(tiny_dir).eval()
    alone = torch.cat([sequence_rewards(rm, *_right_padded([s])) for s in (SHORT, LONG)])
    right = sequence_rewards(rm, *_right_padded([SHORT, LONG]))
    left = sequence_rewards(rm, *_left_padded([SHORT, LONG]))
    assert right.shape == (2,)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    # Reading at the pad position instead (the bug this guards against) gives another number.
    ids, mask = _right_padded([SHORT, LONG])
    hidden = rm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    at_last_column = rm.score(hidden[0, -1]).squeeze()
    assert not torch.isclose(at_last_column, right[0], atol=1e-4)


@torch.no_grad()
def test_reward_model_reuses_the_backbone_and_gets_a_head_seeded_for_every_worker(tiny_dir):
    lm = load_causal_lm(tiny_dir)
    rm = load_reward_model(tiny_dir)
    for name, param in lm.model.state_dict().items():
        assert torch.equal(param, rm.model.state_dict()[name]), name
    assert rm.score.weight.shape == (1, lm.config.hidden_size)
    assert torch.equal(load_reward_model(tiny_dir).score.weight, rm.score.weight)
    assert not torch.equal(load_reward_model(tiny_dir, seed=1).score.weight, rm.score.weight)


def test_reward_model_refuses_a_pad_token_equal_to_eos(tiny_dir):
    with pytest.raises(ValueError, match="equals EOS"):
        load_reward_model(tiny_dir, pad_token_id=1)


@torch.no_grad()
def test_critic_gives_one_value_per_token_that_right_padding_does_not_change(tiny_dir):
    critic = load_critic(tiny_dir).train()  # train mode: would differ run to run with dropout
    ids, mask = _right_padded([SHORT, LONG])
    values = token_values(critic, ids, mask)
    assert values.shape == (2, len(LONG))
    alone = token_values(critic, *_right_padded([SHORT]))
    torch.testing.assert_close(values[0, : len(SHORT)], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(token_values(critic, ids, mask), values, atol=0, rtol=0)


@torch.no_grad()
def test_critic_from_a_saved_reward_model_reuses_its_score_head(tiny_dir, tmp_path):
    rm = load_reward_model(tiny_dir, seed=7)
    rm.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = load_reward_model(tmp_path)
    assert torch.equal(reloaded.score.weight, rm.score.weight)
    critic = load_critic(tmp_path)
    assert torch.equal(critic.score.weight, rm.score.weight)
    assert torch.equal(critic.model.embed_tokens.weight, rm.model.embed_tokens.weight)
