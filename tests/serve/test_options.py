from rlhf.config import load_config
from rlhf.serve.app import deployment_options, model_version


def serve_cfg(*overrides):
    return load_config("configs/tiny_cpu.yaml", list(overrides)).serve


def test_replicas_are_fixed_unless_autoscaling_is_on_and_no_count_is_given():
    fixed = deployment_options(serve_cfg("serve.num_replicas=3", "serve.cpus_per_replica=0.5"))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    auto = serve_cfg("serve.autoscaling=true", "serve.min_replicas=0", "serve.max_replicas=4")
    scaled = deployment_options(auto)
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 4,
        "target_ongoing_requests": 4.0,
    }
    assert deployment_options(auto, replicas=2)["num_replicas"] == 2  # --replicas wins


def test_serve_defaults_bind_to_loopback():
    s = serve_cfg()
    assert (s.host, s.token, s.database_url) == ("127.0.0.1", None, None)


def test_model_version_names_the_stage_and_changes_with_the_weights(tmp_path):
    model = tmp_path / "rl" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"a")
    first = model_version(model)
    assert first.startswith("rl-") and first == model_version(model)
    (model / "model.safetensors").write_bytes(b"b")
    assert model_version(model) != first
