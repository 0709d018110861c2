"""Every config field means the same to every command: each field of `base_config()` is read by some command (a
field read by none is dead), each command reads every field of its job (`JOBS`), and a field a command would
ignore but a user could expect it to follow is refused with an error naming it (`config.NOT_HONOURED`).

"Reads" is found in the source (ast, `tests/source_graph.py`): attribute chains `<x>.<section>.<field>`, names bound
to a section (`co = config.collect`), `section["field"]`, `getattr(section, "field")`, and parameters named
`<section>_config` / `<section>_cfg`; a command reads what the modules it imports (function-level imports too)
read. `config.py` itself is left out (validation is not use), except `for_iteration`, which applies
`rise.iteration_overrides` (for the boost `rise.boost_lr` / `rise.boost_epochs`) for the stages that call it, and
`tokenizer_args`, which says which tokenizer a config means.
"""

from __future__ import annotations

import ml_collections
import pytest

import source_graph as sg
from rise_jax import config as config_lib

COMMANDS = {"run": "rise_jax.run", "evaluate": "rise_jax.evaluate", "train": "rise_jax.train.__main__"}
# Applied by config.py itself, for the modules that call the function named.
APPLIED_BY_CONFIG = {"rise.iteration_overrides": "for_iteration", "rise.boost_lr": "for_iteration",
                     "rise.boost_epochs": "for_iteration", "tokenizer.path": "tokenizer_args",
                     "tokenizer.chat_template": "tokenizer_args"}


def _leaves(node, prefix=""):
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def _sections(node, path="") -> dict[str, set[str]]:
  out = {path: set(node.keys())}
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_sections(value, f"{path}.{key}" if path else key))
  return out


FIELDS = sorted(_leaves(config_lib.base_config()))


def _field_set(*prefixes: str) -> set[str]:
  return {f for f in FIELDS if any(f == p or f.startswith(p + ".") for p in prefixes)}


# What each command's output depends on: every one of these fields must be read by code the command loads.
JOBS = {
    "run": set(FIELDS) - set(config_lib.NOT_HONOURED["run"]),
    "evaluate": _field_set("seed", "output_dir", "model", "tokenizer", "mesh", "task", "sampling", "eval",
                           "collect.max_resample_rounds"),
    "train": _field_set("seed", "output_dir", "model", "tokenizer", "mesh.train", "mesh.on_indivisible",
                        "distributed", "train", "debug.stop_after"),
}


def _calls(module: str, name: str) -> bool:
  import ast
  return any(isinstance(n, ast.Attribute) and n.attr == name or isinstance(n, ast.Name) and n.id == name
             for n in ast.walk(sg.tree(module)))


def reads(command: str) -> set[str]:
  sections = _sections(config_lib.base_config())
  modules = sg.reachable(COMMANDS[command]) - {"rise_jax.config"}
  out = set().union(*(sg.field_reads(m, sections) for m in modules)) & set(FIELDS)
  out |= {f for f, fn in APPLIED_BY_CONFIG.items() if any(_calls(m, fn) for m in modules)}
  return out


def test_the_reader_finds_reads_in_every_form():
  """The detector on the shapes the package uses (so a field is not called dead for the way it is read)."""
  sections = _sections(config_lib.base_config())
  got = sg.field_reads("rise_jax.pipeline.resources", sections)  # c.eval.split via a function, mesh[kind]
  assert {"mesh.train", "mesh.sample", "eval.split", "rise.boost_size", "collect.teacher.kind"} <= got
  assert {"task.test_size", "task.name"} <= sg.field_reads("rise_jax.tasks", sections)  # task_config param
  assert "train.moments_dtype" in sg.field_reads("rise_jax.train.optim", sections)   # getattr(train_cfg, ...)
  assert "train.data_path" not in sg.field_reads("rise_jax.train.trainer", sections)  # cfg.train[k], k in a tuple


def test_no_field_is_dead():
  read_by_some = set().union(*(reads(c) for c in COMMANDS))
  assert sorted(set(FIELDS) - read_by_some) == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_reads_every_field_of_its_job(command):
  assert sorted(JOBS[command] - reads(command)) == []


def test_run_and_evaluate_both_honour_overflow_draws_and_self_refine():
  """sampling.on_overflow, eval.draws and eval.self_refine were honoured by rise_jax.evaluate and ignored by
  rise_jax.run; both now run the one evaluation stage."""
  for command in ("run", "evaluate"):
    assert {"sampling.on_overflow", "eval.draws", "eval.self_refine"} <= reads(command), command


@pytest.mark.parametrize("command", sorted(config_lib.NOT_HONOURED))
def test_a_field_a_command_ignores_is_refused_naming_it(command):
  for field in config_lib.NOT_HONOURED[command]:
    assert field not in reads(command), f"{field} is read by {command}: take it out of NOT_HONOURED"
    c = config_lib.base_config()
    *parents, leaf = field.split(".")
    node = c
    for p in parents:
      node = node[p]
    default = node[leaf]
    node[leaf] = "x" if default is None else not default
    with pytest.raises(ValueError, match=rf"config field {field}: rise_jax.{command} does not read it"):
      config_lib.check_command(c, command)
    config_lib.check_command(config_lib.base_config(), command)  # the default is fine
