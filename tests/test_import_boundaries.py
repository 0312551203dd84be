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
