"""docs/contracts.md §1 lists every config field of `rise_jax.config.base_config()`, by its dotted name in backticks
(e.g. `collect.teacher.kind`), so a field added to the config without documentation fails here, naming it."""

from __future__ import annotations

import pathlib
import re


from rise_jax import config as config_lib
from test_config_fields import _leaves

CONTRACTS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "contracts.md"


def _section_1() -> str:
  text = CONTRACTS.read_text(encoding="utf-8")
  match = re.search(r"^## 1\. .*?(?=^## 2\. )", text, flags=re.S | re.M)
  assert match, "docs/contracts.md has no '## 1.' section followed by '## 2.'"
  return match.group(0)


def test_contracts_section_1_documents_every_config_field():
  section = _section_1()
  missing = [field for field in _leaves(config_lib.base_config()) if f"`{field}`" not in section]
  assert missing == [], f"config fields missing from docs/contracts.md §1: {', '.join(missing)}"


def test_contracts_section_1_documents_no_field_the_config_lacks():
  section = _section_1()
  fields = set(_leaves(config_lib.base_config()))
  table_rows = re.findall(r"^\| `([\w.]+)` \|", section, flags=re.M)
  assert table_rows, "docs/contracts.md §1 has no field table"
  assert sorted(set(table_rows) - fields) == [], "§1 documents fields base_config() does not have"
  assert len(table_rows) == len(set(table_rows)), "a field is listed twice in §1"
