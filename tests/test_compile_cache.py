"""The command-line entry points' persistent compilation cache: default location, the environment's choice, off."""

import jax
import pytest

from rise_jax import compile_cache


@pytest.fixture
def restore_jax_cache_config():
  saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  yield
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


def test_default_location_environment_override_and_off(monkeypatch, tmp_path, restore_jax_cache_config):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert compile_cache.enable() == str(tmp_path / ".cache/rise_jax/xla")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / ".cache/rise_jax/xla")
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0

  jax.config.update("jax_compilation_cache_dir", None)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))  # JAX reads it itself
  assert compile_cache.enable() == str(tmp_path / "mine")
  assert jax.config.jax_compilation_cache_dir is None  # not overwritten

  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
  assert compile_cache.enable() is None
  assert jax.config.jax_compilation_cache_dir is None
