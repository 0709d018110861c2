"""rise_jax never needs torch: every module imports, a checkpoint loads and a forward pass runs without it."""

import json
import pathlib
import subprocess
import sys
import textwrap

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    import importlib, json, pkgutil
    import rise_jax
    names = sorted(m.name for m in pkgutil.walk_packages(rise_jax.__path__, "rise_jax.")
                   if not m.name.endswith("__main__"))  # __main__ modules run their command on import
    for name in names:
      importlib.import_module(name)
    import jax.numpy as jnp
    from rise_jax.models import load_hf_checkpoint
    model = load_hf_checkpoint(sys.argv[1])
    logits = model(jnp.ones((1, 4), jnp.int32))
    assert "torch" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
    print(json.dumps({"modules": names, "shape": list(logits.shape)}))
""")


def test_rise_jax_runs_without_torch(tiny_llama_gqa_path):
  result = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_llama_gqa_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-4000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert "rise_jax.models.hf_io" in out["modules"] and "rise_jax.sharding" in out["modules"]
  assert out["shape"] == [1, 4, 256]
