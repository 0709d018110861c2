"""docs/contracts.md §1 lists every config field of `rise_jax.config.base_config()`, by its dotted name in backticks
(e.g. `collect.teacher.kind`), so a field added to the config without documentation fails here, naming it; §7 names
every key `compute_metrics` writes into metrics.json (and the fields of its `score`)."""

from __future__ import annotations

import pathlib
import re


from rise_jax import config as config_lib
from test_config_fields import _leaves

CONTRACTS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "contracts.md"


def _section(n: int) -> str:
  text = CONTRACTS.read_text(encoding="utf-8")
  match = re.search(rf"^## {n}\. .*?(?=^## {n + 1}\. )", text, flags=re.S | re.M)
  assert match, f"docs/contracts.md has no '## {n}.' section followed by '## {n + 1}.'"
  return match.group(0)


def test_contracts_section_1_documents_every_config_field():
  section = _section(1)
  missing = [field for field in _leaves(config_lib.base_config()) if f"`{field}`" not in section]
  assert missing == [], f"config fields missing from docs/contracts.md §1: {', '.join(missing)}"


def test_contracts_section_1_documents_no_field_the_config_lacks():
  section = _section(1)
  fields = set(_leaves(config_lib.base_config()))
  table_rows = re.findall(r"^\| `([\w.]+)` \|", section, flags=re.M)
  assert table_rows, "docs/contracts.md §1 has no field table"
  assert sorted(set(table_rows) - fields) == [], "§1 documents fields base_config() does not have"
  assert len(table_rows) == len(set(table_rows)), "a field is listed twice in §1"


def test_contracts_section_7_documents_every_metrics_key():
  import rollout_builders as rb
  from rise_jax.rise import metrics

  # Both sources and two draws, so every optional key is written.
  seq = [rb.sequential("a", [("1", 0), ("2", 1)], seed=0), rb.sequential("a", [("1", 1), ("2", 1)], seed=1)]
  m = metrics.compute_metrics(seq, [rb.parallel("a", [("1", 1), ("2", 0)])], num_bootstrap=10)
  section = _section(7)
  named = lambda key: f"`{key}`" in section or f'`"{key}"`' in section  # noqa: E731
  keys = [k for k in m if not re.fullmatch(r"[mp]\d+@t\d+", k)]  # m{k}@t{j} / p{k}@t{j} are documented as patterns
  assert [k for k in keys if not named(k)] == [], "metrics.json keys missing from docs/contracts.md §7"
  assert [k for k in m["score"] if not named(k)] == [], "metrics.json score fields missing from §7"
