"""The pure layer stays pure: it imports and works with Ray, vLLM and DeepSpeed unimportable.

`vllm` may only be imported by actors/rollout.py and `deepspeed` only by rlhf/engine.py.
"""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys
for name in ("ray", "vllm", "deepspeed"):
    sys.modules[name] = None  # `import name` now raises ImportError
import rlhf.algorithms, rlhf.config, rlhf.data, rlhf.data.formats, rlhf.data.pretrain
import rlhf.data.records, rlhf.data.stages, rlhf.models.factory, rlhf.models.tokenizer
import rlhf.monitor
from rlhf.models.factory import apply_lora, build_tiny_model
model = apply_lora(build_tiny_model(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1,
                                    intermediate_size=64), r=2, alpha=4.0, dropout=0.0,
                   target_modules=["q_proj"])
print("ok")
"""


def test_pure_layer_imports_and_works_with_ray_vllm_and_deepspeed_blocked():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_vllm_and_deepspeed_are_each_imported_in_exactly_one_module():
    owners = {"vllm": set(), "deepspeed": set()}
    for path in list((REPO / "rlhf").rglob("*.py")) + list((REPO / "actors").rglob("*.py")):
        for name in owners:
            if re.search(rf"^\s*(import|from) {name}\b", path.read_text(), re.M):
                owners[name].add(str(path.relative_to(REPO)))
    assert owners == {"vllm": {"actors/rollout.py"}, "deepspeed": {"rlhf/engine.py"}}


def _imports(path: Path) -> set[str]:
    found = re.findall(r"^\s*(?:from|import) ((?:rlhf|actors)[\w.]*)", path.read_text(), re.M)
    return set(found)


def test_imports_point_one_way_driver_over_actors_over_compute():
    """The RL driver (step checklist, dispatch, fault recovery, CLI) imports the actors; the
    actors import only what they compute with; that compute layer imports no actor."""
    driver = (
        "rlhf.rl.trainer",
        "rlhf.rl.stage",
        "rlhf.rl.faults",
        "rlhf.rl.dispatch",
        "rlhf.driver",
    )
    for path in (REPO / "actors").rglob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(driver)}
        assert not bad, f"{path.relative_to(REPO)} imports the driver layer: {bad}"
    compute = [
        "rlhf/rl/worker.py",
        "rlhf/rl/experience.py",
        "rlhf/rl/checkpoint.py",
        "rlhf/engine.py",
        "rlhf/monitor.py",
        "rlhf/monitor_rules.py",
    ]
    compute += [
        str(p.relative_to(REPO))
        for d in ("algorithms", "config", "data", "models", "train")
        for p in (REPO / "rlhf" / d).rglob("*.py")
    ]
    for rel in compute:
        bad = {m for m in _imports(REPO / rel) if m.startswith("actors")}
        assert not bad, f"{rel} imports actors: {bad}"
