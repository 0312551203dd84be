"""RLRun's set-up: prompts, length checks, and the role actors on their placement groups.

A mixin of `rlhf.rl.trainer.RLRun` (it reads `self.cfg`, `self.rl`, `self.tok`, `self.groups`,
`self.policy_holds_reference`): the roles this config needs (`rl.roles()`), each as an
`actors.group.ActorGroup`, colocated ones on their host's bundles; the weight-sync group for a
gloo/NCCL broadcast.
"""

from __future__ import annotations

import json
from pathlib import Path

import ray

from rlhf.rl.errors import RLStageError


class ActorLayout:
    def _load_prompts(self, files: list) -> tuple[list[tuple[list[int], str | None, str]], dict]:
        from rlhf.data.records import DataError
        from rlhf.data.render import render_prompt, resolve_prompt_format
        from rlhf.data.stages import load_prompts

        try:
            items, report = load_prompts(files, self.rl.on_error, self.rl.columns)
            fmt = resolve_prompt_format(
                self.rl.prompt_format, self.tok, report["message_lists"], "rl.prompt_format"
            )
        except DataError as exc:
            raise RLStageError(str(exc)) from None
        report["prompt_format"] = fmt
        out = []
        for i, (turns, label) in enumerate(items):
            ids = render_prompt(turns, self.tok, fmt)  # as SFT rows and evaluation render it
            if len(ids) > self.rl.max_prompt_length:
                names = ", ".join(f.path for f in files)
                raise RLStageError(
                    f"prompt {i} of {names} has {len(ids)} tokens > rl.max_prompt_length = "
                    f"{self.rl.max_prompt_length}: raise it or shorten the prompt"
                )
            out.append((ids, label, turns[-1]["content"]))
        if not out:
            raise RLStageError(f"no prompts in {[f.path for f in files]}")
        return out, report

    def _check_lengths(self, policy_dir: str) -> None:
        """Prompt + answer must fit the model's positions: checked before any engine starts (vLLM
        would refuse it there with a traceback)."""
        config = json.loads((Path(policy_dir) / "config.json").read_text())
        limit = config.get("max_position_embeddings")
        need = self.rl.max_prompt_length + self.rl.rollout.max_new_tokens
        if limit is not None and need > limit:
            raise RLStageError(
                f"rl.max_prompt_length + rl.rollout.max_new_tokens = {self.rl.max_prompt_length} "
                f"+ {self.rl.rollout.max_new_tokens} = {need} exceeds the model's "
                f"max_position_embeddings = {limit} ({policy_dir}/config.json): lower one of them"
            )

    def _start_actors(self, policy_dir: str, rm_dir: str | None, critic_dir: str) -> dict:
        from actors.group import ActorGroup, ResourceError, validate_resources

        rl = self.rl
        available = ray.available_resources()
        try:
            # A colocated group's bundles: rl.colocate_cpus, or its first role's CPUs.
            bundles = {
                g[0]: rl.bundle_cpus(g, available.get("CPU", 0.0)) for g in rl.colocated_groups()
            }
            validate_resources(rl.resource_requests(available.get("CPU", 0.0)), available)
        except (ResourceError, ValueError) as exc:
            raise RLStageError(f"rl: {exc}") from None
        paths = {
            "policy": policy_dir,
            "reference": policy_dir,
            "rollout": policy_dir,
            "critic": critic_dir,
            "reward_model": rm_dir,
        }
        if "reward_model" in rl.roles() and not rm_dir:
            raise RLStageError(
                "rl.reward.kind='model' but no reward model checkpoint: add 'rm' "
                "to run.stages or set rl.reward.model_path"
            )
        # a colocated role that is not started hosts nobody
        host = {r: g[0] for g in rl.colocated_groups() for r in g}
        groups: dict[str, ActorGroup] = {}
        try:
            self._spawn_groups(groups, host, paths, bundles)
            ray.get([a.__ray_ready__.remote() for g in groups.values() for a in g.actors])
        except BaseException:  # an actor that failed to start: free what was reserved
            for group in reversed(list(groups.values())):
                group.kill()
            raise
        return groups

    def _spawn_groups(self, groups: dict, host: dict, paths: dict, bundles: dict) -> None:
        """One ActorGroup per role, hosts (reserving `bundles[host]` CPUs per bundle) before the
        roles colocated on their bundles.

        Colocated roles take turns: each actor runs as many torch threads as its bundle has CPUs
        (`actors.group.bundle_threads`), which is right only while no two roles of one bundle
        compute at once. `step` keeps that: every phase waits for the previous one; the only
        overlaps are the weight sync (the policy sends while the engines receive: I/O) and
        checkpoint save/restore (policy and critic write or read at once: I/O)."""
        from actors.group import ActorGroup
        from actors.roles import ROLE_ACTORS
        from actors.rollout import RolloutActor

        rl = self.rl
        # the policy's actor holds the frozen reference: it loads it again when re-created
        holds = self.policy_holds_reference
        extra = {"policy": {"reference_path": paths["reference"]}} if holds else {}
        order = sorted(rl.roles(), key=lambda r: (host.get(r, r) != r, r != "policy"))
        for role in order:
            spec = rl.rollout if role == "rollout" else getattr(rl, role)
            count = rl.rollout.num_engines if role == "rollout" else spec.num_actors
            cpus = rl.rollout.cpus_per_engine if role == "rollout" else spec.cpus_per_actor
            cpus = bundles.get(role, cpus)  # ignored by a colocated rider: its host's bundles
            gpus = (  # a tensor-parallel engine holds tensor_parallel_size whole GPUs
                rl.rollout.gpus_per_engine * rl.rollout.tensor_parallel_size
                if role == "rollout"
                else spec.gpus_per_actor
            )
            first = next((r for r in [host.get(role, role)] if r in groups and r != role), None)
            cls = RolloutActor if role == "rollout" else ROLE_ACTORS[role]
            groups[role] = ActorGroup(
                cls,
                role,
                count,
                cpus_per_actor=cpus,
                gpus_per_actor=gpus,
                colocate_with=groups[first] if first else None,
                actor_kwargs={"cfg": self.cfg, "model_path": paths[role], **extra.get(role, {})},
            )

    def engine_actors(self) -> list:
        """The actors that generate: the rollout engines, or with rollout.backend='policy' the
        policy's own actors."""
        return self.groups["policy" if self.rl.generates_in_policy else "rollout"].actors

    def init_weight_broadcast(self) -> None:
        """A fresh weight-sync group (gloo or NCCL): policy rank 0 as member 0 and the host of
        its TCP store (a new port on its node), engine i as member 1 + i. All join at once."""
        from actors.group import _master_address

        policy, engines = self.groups["policy"], self.groups["rollout"].actors
        strategy = policy._strategy(0)  # the store listens on policy rank 0's node
        address, port = ray.get(_master_address.options(scheduling_strategy=strategy).remote())
        world, backend = 1 + len(engines), self.rl.weight_sync_backend
        ray.get(
            [policy.actors[0].init_weight_transfer.remote(address, port, world, backend)]
            + [e.init_weight_sync.remote(address, port, world, backend) for e in engines]
        )
