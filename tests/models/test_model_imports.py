"""The models package stays pure: it works with Ray, vLLM and DeepSpeed unimportable."""

import subprocess
import sys

SCRIPT = """
import sys
for name in ("ray", "vllm", "deepspeed"):
    sys.modules[name] = None  # `import name` now raises ImportError
from rlhf.models.factory import apply_lora, build_tiny_model
model = apply_lora(build_tiny_model(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1,
                                    intermediate_size=64), r=2, alpha=4.0, dropout=0.0,
                   target_modules=["q_proj"])
print("ok")
"""


def test_models_import_and_work_with_ray_vllm_and_deepspeed_blocked():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
