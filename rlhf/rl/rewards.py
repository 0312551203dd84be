"""Reward sources other than a reward model: rule-based Python functions and a remote endpoint.

A rule is a plain function `(prompt: str, response: str, label: str | None) -> float`:

    rule = load_rule("exact_match")                  # built in
    rule = load_rule("my_pkg.rewards:unit_tests")    # any importable function

The HTTP source POSTs one JSON body per batch and expects one number per sample back:

    request:  {"prompts": [...], "responses": [...], "labels": [...]}
    response: {"rewards": [0.0, 1.0, ...]}

Every failure (unreachable, timeout, a non-2xx status, a malformed body, a wrong count, a
non-number) raises `RewardError` naming the URL and the problem; nothing is silently zero.
"""

from __future__ import annotations

import importlib
import json
import math
import urllib.error
import urllib.request
from collections.abc import Callable

RuleFn = Callable[[str, str, "str | None"], float]


class RewardError(RuntimeError):
    """A reward source failed or returned something unusable."""


def exact_match(prompt: str, response: str, label: str | None) -> float:
    """1.0 when the response equals the label after stripping whitespace, else 0.0."""
    if label is None:
        raise RewardError(f"exact_match needs a label for every prompt; {prompt!r} has none")
    return 1.0 if response.strip() == label.strip() else 0.0


def digit_match(prompt: str, response: str, label: str | None) -> float:
    """Exact match with partial credit for numeric answers: 1.0 when exact; otherwise half the
    share of digit positions (aligned from the right) that agree; 0.0 for a non-number.

    A denser signal than `exact_match` for arithmetic: the tens digit can be right while the
    units digit is not, and the policy learns from both.
    """
    if label is None:
        raise RewardError(f"digit_match needs a label for every prompt; {prompt!r} has none")
    got, want = response.strip(), label.strip()
    if got == want:
        return 1.0
    if not got.isdigit() or not want.isdigit():
        return 0.0
    width = max(len(got), len(want))
    same = sum(a == b for a, b in zip(got.rjust(width, " "), want.rjust(width, " ")))
    return 0.5 * same / width


RULES: dict[str, RuleFn] = {"exact_match": exact_match, "digit_match": digit_match}


def reward_fn_problem(reward_fn: object, kind: str) -> str | None:
    """Why a reward function passed in from Python cannot score samples when rl.reward.kind is
    `kind`; None when it can."""
    if not callable(reward_fn):
        return f"reward_fn {reward_fn!r} is not callable"
    if kind != "rule":
        return (
            f"reward_fn was given but rl.reward.kind = {kind!r}: set rl.reward.kind=rule to use it"
        )
    return None


def load_rule(spec: str) -> RuleFn:
    """A built-in rule by name, or `package.module:function`."""
    if spec in RULES:
        return RULES[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise RewardError(
            f"rl.reward.rule = {spec!r}: not a built-in rule {sorted(RULES)} and "
            "not of the form 'package.module:function'"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RewardError(f"rl.reward.rule = {spec!r}: cannot load it: {exc}") from None
    if not callable(fn):
        raise RewardError(f"rl.reward.rule = {spec!r}: {attr} is not callable")
    return fn


def rule_rewards(
    rule: RuleFn, prompts: list[str], responses: list[str], labels: list[str | None]
) -> list[float]:
    out = []
    for p, r, y in zip(prompts, responses, labels):
        value = float(rule(p, r, y))
        if not math.isfinite(value):
            raise RewardError(f"reward rule returned {value} for prompt {p!r}")
        out.append(value)
    return out


def http_rewards(
    url: str,
    prompts: list[str],
    responses: list[str],
    labels: list[str | None],
    timeout_s: float = 30.0,
) -> list[float]:
    body = json.dumps({"prompts": prompts, "responses": responses, "labels": labels}).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            payload = reply.read()
    except urllib.error.HTTPError as exc:
        raise RewardError(f"reward endpoint {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RewardError(f"reward endpoint {url}: unreachable ({reason})") from None
    try:
        rewards = json.loads(payload)["rewards"]
    except (ValueError, KeyError, TypeError):
        raise RewardError(
            f'reward endpoint {url}: expected JSON {{"rewards": [...]}}, got {payload[:200]!r}'
        ) from None
    if not isinstance(rewards, list) or len(rewards) != len(prompts):
        got = len(rewards) if isinstance(rewards, list) else type(rewards).__name__
        raise RewardError(f"reward endpoint {url}: sent {len(prompts)} samples, got {got} rewards")
    out = []
    for i, value in enumerate(rewards):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise RewardError(
                f"reward endpoint {url}: rewards[{i}] = {value!r} is not a finite number"
            )
        out.append(float(value))
    return out
