"""The package's floors (docs/architecture.md), read from the source with `ast`: no import circle and no import
from a lower floor to a higher one. Function-level imports count: hiding an import in a function does not make
the dependency go away."""

from __future__ import annotations

import source_graph as sg

# Bottom to top. A module belongs to the longest entry naming it or a package above it; a module may import its
# own floor (acyclically) and the floors below. `rise_jax` alone is the package's own __init__.
FLOORS = [
    ("base", ["rise_jax", "rise_jax.sharding", "rise_jax.tasks", "rise_jax.files", "rise_jax.logs",
              "rise_jax.provenance", "rise_jax.compile_cache", "rise_jax.hf_files", "rise_jax.gguf"]),
    ("chat", ["rise_jax.chat"]),
    ("models", ["rise_jax.models"]),
    ("config", ["rise_jax.config"]),  # validate() checks names against the task and model registries below it
    ("train/sampling", ["rise_jax.train", "rise_jax.sampling"]),
    ("rollout", ["rise_jax.rollout"]),
    ("rise", ["rise_jax.rise"]),
    ("pipeline", ["rise_jax.pipeline"]),
    ("commands", ["rise_jax.run", "rise_jax.evaluate", "rise_jax.train.__main__", "rise_jax.models.convert"]),
]


def floor_of(module: str) -> int:
  best, floor = "", None
  for i, (_, names) in enumerate(FLOORS):
    for name in names:
      matches = module == name or (name != "rise_jax" and module.startswith(name + "."))
      if matches and len(name) > len(best):
        best, floor = name, i
  assert floor is not None, f"{module} is on no floor: add it to FLOORS and docs/architecture.md"
  return floor


def upward_imports(edges: dict[str, frozenset[str]]) -> list[str]:
  return [f"{m} ({FLOORS[floor_of(m)][0]}) imports {d} ({FLOORS[floor_of(d)][0]})"
          for m, deps in sorted(edges.items()) for d in sorted(deps) if floor_of(d) > floor_of(m)]


def test_every_module_is_on_a_floor_and_the_graph_was_read():
  edges = sg.graph()
  assert len(edges) > 60 and all(floor_of(m) is not None for m in edges)
  assert "rise_jax.rise.algorithm" in edges["rise_jax.pipeline.stages"]  # a function-level import is an edge
  assert "rise_jax.train" in sg.imports("rise_jax.pipeline.stages")


def test_no_import_circles():
  assert sg.cycles(sg.graph()) == []


def test_no_import_from_a_lower_floor_to_a_higher_one():
  assert upward_imports(sg.graph()) == []


def test_the_checks_catch_a_circle_and_an_upward_import():
  """The checks themselves, on the real graph with one plausible mistake added each time."""
  edges = dict(sg.graph())
  upward = dict(edges, **{"rise_jax.train.demo": edges["rise_jax.train.demo"] | {"rise_jax.tasks.toy",
                                                                                  "rise_jax.rise.conversion"}})
  assert upward_imports(upward) == ["rise_jax.train.demo (train/sampling) imports rise_jax.rise.conversion (rise)"]
  circle = dict(edges, **{"rise_jax.models.build": edges["rise_jax.models.build"] | {"rise_jax.models.load"}})
  assert sg.cycles(circle) == [["rise_jax.models.build", "rise_jax.models.hf_io", "rise_jax.models.load"]]
