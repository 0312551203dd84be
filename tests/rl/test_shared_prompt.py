"""Rows that share a prompt run it once (`response_logits(..., share_prompts=True)`): the same
logits and gradients as every row running its own prompt, with the prompt tokens computed once
per distinct prompt."""

import torch

from rlhf.algorithms.lm import token_logprobs
from rlhf.models.factory import build_tiny_model
from rlhf.rl.experience import build_batch, response_logits, response_tokens

SIZE = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)


def _batch(shuffle: bool):
    """4 prompts of 3-9 tokens (left-padded), 5 samples each of 1-7 tokens (right-padded)."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (3, 9, 5, 9)]
    rows = [p for p in prompts for _ in range(5)]
    order = torch.randperm(len(rows), generator=gen).tolist() if shuffle else range(len(rows))
    rows = [rows[i] for i in order]
    responses = [
        torch.randint(3, 250, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen)
        for _ in rows
    ]
    responses = [r.tolist() for r in responses]
    return build_batch(rows, responses, [[0.0] * len(r) for r in responses], pad_id=0)


def _logprobs_and_grads(model, batch, share: bool):
    model.zero_grad()
    logp = token_logprobs(response_logits(model, batch, share), response_tokens(batch))
    logp = logp * batch.response_mask
    (logp.sum() * 0.1).backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Float rounding of sums taken in another order: small against the tensor's largest entry."""
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale + 1e-8, msg=name)


def test_shared_prompts_give_every_rows_own_logprobs_and_gradients_with_fewer_prompt_tokens():
    model = build_tiny_model(seed=0, **SIZE)
    seen = []
    model.model.embed_tokens.register_forward_hook(
        lambda m, args, out: seen.append(args[0].numel())
    )
    for shuffle in (False, True):  # a group's samples together, or scattered over the batch
        batch = _batch(shuffle)
        seen.clear()
        plain, plain_grads = _logprobs_and_grads(model, batch, share=False)
        plain_tokens = sum(seen)
        seen.clear()
        shared, shared_grads = _logprobs_and_grads(model, batch, share=True)
        torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
        for name, grad in plain_grads.items():
            _assert_close_to_scale(shared_grads[name], grad, name)
        # 20 rows x (9 prompt + 7 response) positions, against 4 x 9 prompt + 20 x 7 response.
        P, R = batch.prompt_length, batch.response_mask.shape[1]
        assert plain_tokens == 20 * (P + R) and sum(seen) == 4 * P + 20 * R


def test_without_a_repeated_prompt_the_plain_forward_runs():
    model = build_tiny_model(seed=0, **SIZE)
    distinct = _batch(shuffle=False).rows(0, 1)  # one row: nothing to share
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(1))
    torch.testing.assert_close(
        response_logits(model, distinct, True), response_logits(model, distinct, False)
    )
    assert len(calls) == 2  # one forward each way


def test_a_critic_values_each_response_state_the_same_with_shared_prompts(tmp_path):
    from rlhf.models.factory import load_critic

    build_tiny_model(seed=0, **SIZE).save_pretrained(tmp_path)
    critic = load_critic(tmp_path)
    batch = _batch(shuffle=True)
    out = {}
    for share in (False, True):
        critic.zero_grad()
        values = response_logits(critic, batch, share, causal_lm=False).squeeze(-1)
        (values * batch.response_mask).sum().backward()
        out[share] = values.detach(), {n: p.grad.clone() for n, p in critic.named_parameters()}
    assert out[True][0].shape == batch.response_mask.shape
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    for name, grad in out[False][1].items():
        _assert_close_to_scale(out[True][1][name], grad, name)
