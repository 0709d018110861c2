"""Where a result came from: installed package versions and the git commit of the rise_jax checkout. The one
copy, written into run.json (`rise_jax.pipeline.rundir`) and every rollout log header (`rise_jax.rollout.log`)."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import subprocess
from typing import Iterable

# The packages whose versions change results (numerics, checkpoints, tokenization).
VERSIONED_PACKAGES = ("rise_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "transformers")


def package_versions(packages: Iterable[str] = VERSIONED_PACKAGES) -> dict[str, str | None]:
  """Installed versions of `packages` (None when not installed), read without importing them."""
  out = {}
  for name in packages:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def git_commit(repo_dir: str | os.PathLike | None = None) -> str | None:
  """HEAD of the checkout holding rise_jax, or None outside a git checkout."""
  repo_dir = repo_dir or pathlib.Path(__file__).resolve().parent
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return (out.stdout.strip() or None) if out.returncode == 0 else None
