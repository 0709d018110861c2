"""The persistent XLA compilation cache the command-line entry points turn on (`rise_jax.run`, `.evaluate`,
`.train`).

Every stage builds fresh jitted closures (a new engine, a new trainer) for shapes an earlier stage already
compiled, and a resumed run compiles everything again; with the cache on disk those compiles become lookups. The
location is `~/.cache/rise_jax/xla` unless `JAX_COMPILATION_CACHE_DIR` names another (JAX's own variable, as are
`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` and the rest, which override the defaults set here); an empty
`JAX_COMPILATION_CACHE_DIR` turns the cache off. Library calls (`rise_jax.pipeline.run`, notebooks) leave JAX's
settings alone.
"""

from __future__ import annotations

import os

DEFAULT_DIR = "~/.cache/rise_jax/xla"


def enable() -> str | None:
  """Point JAX at the cache directory (unless the environment already chose one); returns the directory, None
  when the environment turned the cache off."""
  import jax
  location = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if location == "":
    return None
  if location is None:
    location = os.path.expanduser(DEFAULT_DIR)
    jax.config.update("jax_compilation_cache_dir", location)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the toy's compiles are ~0.1-1 s each
  return location
