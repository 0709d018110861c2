"""The package read as source (ast, nothing imported): its modules, their imports (function-level ones too) and
the config fields each module reads. Shared by the layering and the config-field tests."""

from __future__ import annotations

import ast
import functools
import pathlib
from typing import Iterable

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rise_jax"


@functools.cache
def modules() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every module of rise_jax (a package is its __init__)."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


@functools.cache
def tree(module: str) -> ast.Module:
  return ast.parse(modules()[module].read_text(encoding="utf-8"), filename=str(modules()[module]))


def _known(name: str) -> str | None:
  """The longest prefix of `name` that is a rise_jax module."""
  while name and name not in modules():
    name = name.rpartition(".")[0]
  return name or None


def imports(module: str, source: ast.AST | None = None) -> set[str]:
  """The rise_jax modules `module` imports anywhere in its source (module level or inside functions)."""
  is_package = modules()[module].name == "__init__.py"
  out = set()
  for node in ast.walk(source if source is not None else tree(module)):
    if isinstance(node, ast.Import):
      out.update(_known(a.name) for a in node.names if a.name.startswith("rise_jax"))
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolved against the importing module's package
        base = module.split(".")[:len(module.split(".")) - node.level + is_package]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module or ""
      if not target.startswith("rise_jax"):
        continue
      for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
        out.add(_known(f"{target}.{alias.name}") if f"{target}.{alias.name}" in modules() else _known(target))
  out.discard(None)
  out.discard(module)
  return out


@functools.cache
def graph() -> dict[str, frozenset[str]]:
  return {m: frozenset(imports(m)) for m in modules()}


def reachable(start: str, edges: dict[str, Iterable[str]] | None = None) -> set[str]:
  """Every module importing `start` may load (itself included)."""
  edges = graph() if edges is None else edges
  seen, todo = set(), [start]
  while todo:
    m = todo.pop()
    if m not in seen:
      seen.add(m)
      todo.extend(edges.get(m, ()))
  return seen


def cycles(edges: dict[str, Iterable[str]]) -> list[list[str]]:
  """The import circles of `edges`: strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


# -- config field reads -------------------------------------------------------------------------------------------

def field_reads(module: str, sections: dict[str, set[str]]) -> set[str]:
  """Dotted config fields `module` reads: `<anything>.<section>.<field>` attribute chains, `x[<"field">]` on a
  section, and names bound to a section (`co = config.collect; co.turns`). A section indexed by a variable
  (`config.mesh[kind]`) reads all its fields. `sections`: section path -> its field names ("" = top level)."""
  out: set[str] = set()

  def path_of(node, aliases) -> str | None:
    """The section path an expression denotes (e.g. "collect.teacher"), or None."""
    if isinstance(node, ast.Name):
      return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
      inner = path_of(node.value, aliases)
      if inner is not None:
        candidate = f"{inner}.{node.attr}" if inner else node.attr
        return candidate if candidate in sections else None
      return node.attr if node.attr in sections and node.attr else None
    return None

  constants = {}  # module-level NAME = ("a", "b"): the values a loop over NAME binds
  for node in tree(module).body:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
      try:
        value = ast.literal_eval(node.value)
      except ValueError:
        continue
      if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        constants[node.targets[0].id] = value

  def visit(scope: ast.AST, aliases: dict[str, str]):
    aliases = dict(aliases)
    loops = {}  # loop variable -> the strings it takes (`for k in ("a", "b")`, `for k in NAME`)
    for node in ast.walk(scope):
      for target, iterable in ([(node.target, node.iter)] if isinstance(node, (ast.For, ast.comprehension)) else []):
        if isinstance(target, ast.Name):
          if isinstance(iterable, ast.Name) and iterable.id in constants:
            loops[target.id] = constants[iterable.id]
          else:
            try:
              value = ast.literal_eval(iterable)
            except ValueError:
              continue
            if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
              loops[target.id] = tuple(value)
    for node in ast.walk(scope):
      if isinstance(node, ast.Assign) and len(node.targets) == 1:
        targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else [node.targets[0]]
        values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
        for target, value in zip(targets, values):
          section = path_of(value, aliases)
          if isinstance(target, ast.Name) and section is not None:
            aliases[target.id] = section
    for node in ast.walk(scope):
      if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
        section = path_of(node.value, aliases)
        if section is not None and node.attr in sections[section]:
          out.add(f"{section}.{node.attr}" if section else node.attr)
        elif section is None and isinstance(node.value, (ast.Name, ast.Attribute)):
          # cfg.seed / config.output_dir: a top-level field read off a config object
          name = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
          if name in ("c", "cfg", "config") and node.attr in sections[""]:
            out.add(node.attr)
      elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
        section = path_of(node.args[0], aliases)
        if section is not None and node.args[1].value in sections[section]:
          out.add(f"{section}.{node.args[1].value}" if section else node.args[1].value)
      elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
        section = path_of(node.value, aliases)
        if section is None:
          continue
        key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
          if key.value in sections[section]:
            out.add(f"{section}.{key.value}" if section else key.value)
        elif isinstance(key, ast.Name) and key.id in loops:
          out.update(f"{section}.{f}" if section else f for f in loops[key.id] if f in sections[section])
        else:  # an index we cannot resolve: every field of the section may be read
          out.update(f"{section}.{f}" if section else f for f in sections[section] if f"{section}.{f}" not in sections)

  def scopes(body):  # each top-level function (methods included) is a scope; module-level code is another
    for node in body:
      if isinstance(node, ast.ClassDef):
        yield from scopes(node.body)
      elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield node
      else:
        yield node

  for scope in scopes(tree(module).body):
    aliases = {}
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for arg in scope.args.args + scope.args.kwonlyargs:  # task_from_config(task_config), load_model(model_cfg)
        head, sep, tail = arg.arg.rpartition("_")
        if sep and tail in ("config", "cfg") and head in sections:
          aliases[arg.arg] = head
    visit(scope, aliases)
  return out
