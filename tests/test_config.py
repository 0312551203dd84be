"""The typed config tree: defaults, YAML + dotted overrides, and loud validation."""

from pathlib import Path

import pytest

from rlhf.config import Config, ConfigError, load_config

CONFIGS = sorted(
    Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")
)  # not kuberay/ (manifests)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_yaml_loads_validates_and_opens_with_a_header(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name} must open with a header comment"
    assert "rlhf run" in path.read_text(), f"{path.name} header must show its launch command"


def test_shipped_configs_include_the_embedded_default_and_a_gpu_model():
    names = {p.name for p in CONFIGS}
    assert "tiny_cpu.yaml" in names
    gpu = [load_config(p) for p in CONFIGS if p.name != "tiny_cpu.yaml"]
    assert any(c.model.path and c.sft.use_gpu for c in gpu)


def test_dotted_overrides_take_precedence_over_yaml_with_typed_values():
    cfg = load_config(
        CONFIGS[0].parent / "tiny_cpu.yaml",
        ["sft.lr=1e-4", "run.stages=[sft,dpo]", "dpo.loss=ipo", "sft.lora.enabled=true"],
    )
    assert cfg.sft.lr == pytest.approx(1e-4)
    assert cfg.run.stages == ["sft", "dpo"]
    assert cfg.dpo.loss == "ipo"
    assert cfg.sft.lora.enabled is True


def test_unknown_key_is_rejected_with_the_closest_key_suggested():
    with pytest.raises(ConfigError, match=r"sft\.lrr: unknown key \(did you mean 'sft\.lr'\?\)"):
        load_config(None, ["sft.lrr=0.1", "run.stages=[]"])


def test_wrong_type_names_the_key_the_value_and_the_expected_type():
    with pytest.raises(
        ConfigError, match=r"sft\.max_steps = 'many': Input should be a valid integer"
    ):
        load_config(None, ["sft.max_steps=many", "run.stages=[]"])


def test_a_quoted_number_in_yaml_is_not_silently_converted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {stages: []}\nsft: {max_steps: '10'}\n")
    with pytest.raises(ConfigError, match=r"sft\.max_steps = '10'"):
        load_config(path)


def test_batch_sizes_that_do_not_divide_are_an_impossible_combination():
    with pytest.raises(
        ConfigError,
        match=r"global_batch_size=30 must be a multiple of "
        r"micro_batch_size \* num_workers = 8 \* 2 = 16",
    ):
        load_config(None, ["sft.global_batch_size=30", "run.stages=[]"])


def test_stages_out_of_pipeline_order_are_rejected():
    with pytest.raises(ConfigError, match="must follow pipeline order"):
        load_config(CONFIGS[0].parent / "tiny_cpu.yaml", ["run.stages=[dpo,sft]"])


def test_a_stage_without_data_is_rejected():
    with pytest.raises(ConfigError, match=r"rm\.train_files is empty"):
        load_config(None, ["run.stages=[rm]"])


def test_pretraining_mix_must_cover_the_sources_and_sum_to_one():
    with pytest.raises(ConfigError, match="must sum to 1"):
        load_config(CONFIGS[0].parent / "tiny_cpu.yaml", ["pretrain.mix.web=0.5"])


def test_label_smoothing_outside_cdpo_is_rejected_not_rewritten():
    with pytest.raises(ConfigError, match="only applies to loss='cdpo'"):
        load_config(None, ["dpo.label_smoothing=0.1", "run.stages=[]"])


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_override_without_equals_sign_is_explained():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["sft.lr"])


def test_fingerprint_changes_with_any_setting():
    a = load_config(None, ["run.stages=[]"])
    b = load_config(None, ["run.stages=[]", "sft.lr=0.5"])
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == load_config(None, ["run.stages=[]"]).fingerprint()


def test_derived_gradient_accumulation_steps():
    cfg = load_config(
        None,
        [
            "run.stages=[]",
            "sft.global_batch_size=64",
            "sft.micro_batch_size=8",
            "sft.num_workers=2",
        ],
    )
    assert cfg.sft.grad_accum_steps == 4  # 64 / (8 * 2)


def test_a_tiny_model_head_size_vllm_cannot_run_is_rejected():
    with pytest.raises(ConfigError, match=r"hidden_size/num_heads = 32/2 = 16"):
        load_config(
            None,
            [
                "run.stages=[]",
                "model.tiny.hidden_size=32",
                "model.tiny.num_heads=2",
                "model.tiny.num_kv_heads=2",
            ],
        )


def test_the_kl_goes_into_the_loss_for_grpo_and_the_reward_otherwise():
    auto = {
        alg: load_config(None, ["run.stages=[]", f"rl.algorithm={alg}"]).rl
        for alg in ("ppo", "grpo", "rloo", "reinforce_pp")
    }
    assert [(alg, rl.kl_as_reward, rl.kl_estimate) for alg, rl in auto.items()] == [
        ("ppo", True, "k1"),
        ("grpo", False, "k3"),
        ("rloo", True, "k1"),
        ("reinforce_pp", True, "k1"),
    ]
    chosen = load_config(None, ["run.stages=[]", "rl.kl_in_reward=false", "rl.kl_estimator=k2"])
    assert (chosen.rl.kl_as_reward, chosen.rl.kl_estimate) == (False, "k2")


def test_grpo_with_the_kl_in_its_reward_is_rejected_with_the_reason():
    with pytest.raises(ConfigError, match=r"kl_in_reward=true with algorithm='grpo'.*std"):
        load_config(None, ["run.stages=[]", "rl.algorithm=grpo", "rl.kl_in_reward=true"])
    # Without a KL penalty there is nothing to amplify.
    load_config(
        None, ["run.stages=[]", "rl.algorithm=grpo", "rl.kl_in_reward=true", "rl.kl_coef=0"]
    )


def test_group_filtering_needs_groups():
    with pytest.raises(ConfigError, match=r"filter_groups=true .* samples_per_prompt=1 must be"):
        load_config(
            None,
            [
                "run.stages=[]",
                "rl.filter_groups=true",
                "rl.samples_per_prompt=1",
                "rl.mini_batch_size=32",
            ],
        )


GPU_RL = ["run.stages=[]", "rl.policy.gpus_per_actor=1", "rl.rollout.gpus_per_engine=1"]


def test_weight_sync_auto_broadcasts_over_nccl_only_between_separate_gpus():
    def backend(*extra):
        return load_config(None, ["run.stages=[]", *extra]).rl.weight_sync_backend

    assert backend() == "object_store"  # CPU: the demo's path
    assert backend("rl.rollout.weight_sync=gloo") == "gloo"  # the GPU protocol, testable on CPU
    assert backend(*GPU_RL[1:]) == "nccl"
    # An engine on its policy rank's GPU cannot share an NCCL group with it.
    colocated = [
        "rl.policy.gpus_per_actor=0.5",
        "rl.rollout.gpus_per_engine=0.5",
        "rl.colocate=[[policy, rollout]]",
    ]
    assert backend(*colocated) == "object_store"
    with pytest.raises(ConfigError, match=r"weight_sync='nccl' with rollout colocated"):
        backend(*colocated, "rl.rollout.weight_sync=nccl")
    with pytest.raises(ConfigError, match=r"weight_sync='nccl' needs GPUs"):
        backend("rl.rollout.weight_sync=nccl")


def test_a_tensor_parallel_engine_holds_whole_gpus_and_cpu_engines_cannot_shard():
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2 .* on CPU .* must be 1"):
        load_config(None, ["run.stages=[]", "rl.rollout.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"gpus_per_engine=1 \(got 0.5\)"):
        load_config(
            None, [*GPU_RL, "rl.rollout.gpus_per_engine=0.5", "rl.rollout.tensor_parallel_size=2"]
        )
    with pytest.raises(ConfigError, match=r"cannot be colocated"):
        load_config(
            None,
            [
                *GPU_RL,
                "rl.rollout.tensor_parallel_size=2",
                "rl.reference.gpus_per_actor=1",
                "rl.colocate=[[reference, rollout]]",
            ],
        )
    cfg = load_config(
        None, [*GPU_RL, "rl.rollout.num_engines=3", "rl.rollout.tensor_parallel_size=2"]
    )
    assert cfg.rl.resource_requests()["rollout"]["GPU"] == 6.0  # 3 engines x 2 GPUs
    with pytest.raises(ConfigError, match=r"with rollout.backend='transformers': only vLLM"):
        load_config(
            None,
            [*GPU_RL, "rl.rollout.tensor_parallel_size=2", "rl.rollout.backend=transformers"],
        )


def test_generating_in_the_policy_drops_the_rollout_role_and_refuses_what_it_cannot_do():
    base = ["run.stages=[]", "rl.rollout.backend=policy"]
    cfg = load_config(
        None, [*base, "rl.colocate=[[policy, reference, rollout]]", "rl.reference.placement=actor"]
    )
    assert "rollout" not in cfg.rl.roles() and cfg.rl.generates_in_policy
    assert cfg.rl.colocated_groups() == [["policy", "reference"]]
    assert "rollout" not in cfg.rl.resource_requests(2.0)
    assert not cfg.rl.uses_broadcast_sync
    assert "rollout" in load_config(None, ["run.stages=[]"]).rl.roles()
    shared = [  # on GPU a colocated engine would sleep while the policy trains; here none starts
        "rl.policy.gpus_per_actor=0.5",
        "rl.rollout.gpus_per_engine=0.5",
        "rl.colocate=[[policy, rollout]]",
    ]
    assert load_config(None, [*GPU_RL, *shared]).rl.engines_sleep
    assert not load_config(None, [*base, *GPU_RL[1:], *shared]).rl.engines_sleep
    refused = {
        "rl.policy.zero_stage=3": r"policy.zero_stage=3: ZeRO-3 shards",
        "rl.max_staleness=1": r"max_staleness=1: the policy cannot generate ahead",
        "rl.rollout.num_engines=2": r"rollout.num_engines=2: the policy's actors are the engines",
        "rl.rollout.weight_sync=gloo": r"rollout.weight_sync='gloo': no weights are sent",
        "rl.rollout.tensor_parallel_size=2": r"backend='policy': only vLLM shards",
    }
    for override, message in refused.items():
        extra = ["rl.truncated_is_cap=2", "rl.colocate=[]"] if "staleness" in override else []
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, override, *extra])
