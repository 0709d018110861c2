"""Write one iteration's training set (`rise_jax.sft/1`) with its manifest, summary and weight histogram.

Layout under a collection directory (docs/contracts.md §6, `iter_<T>/collect/`):
  data/sft.jsonl        one training record per line (docs/contracts.md §4)
  data/manifest.json    schema, dataset version (the iteration), record count, sha256 of sft.jsonl, options
  summary.json / .md    counts per criterion and per reward, the weight table over the grader's reward range,
                        dedupe / only_success removals, token drift
  weights_hist.png      histogram of the example weights
Every file is written to a temporary name and renamed, so a reader never sees half a dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pathlib
from typing import Any, Iterable, Sequence

from rise_jax import chat
from rise_jax import files
from rise_jax.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from rise_jax.rise.algorithm import weight_table
from rise_jax.rise.conversion import SFT_SCHEMA, Conversion, ConversionOptions

DATA_FILE = "sft.jsonl"


def write_records(records: Iterable[dict[str, Any]], path: pathlib.Path) -> str:
  """Write records as jsonl atomically; returns the file's sha256."""
  text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
  atomic_write_text(path, text)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verify_dataset(data_dir: pathlib.Path, hint: str) -> None:
  """Refuse a data directory whose sft.jsonl no longer has the sha256 its manifest.json recorded."""
  manifest = data_dir / "manifest.json"
  files.verify_sha256(data_dir / DATA_FILE, files.read_json(manifest, hint)["sha256"], manifest, hint)


def _strip_eos(ids: Sequence[int], eos: Sequence[int]) -> list[int]:
  ids = list(ids)
  while ids and ids[-1] in eos:
    ids.pop()
  return ids


def token_drift(records: Sequence[dict[str, Any]], sampled_ids: Sequence[Sequence[int] | None],
                tokenizer) -> dict[str, Any]:
  """How many trained actions re-tokenise differently from the ids the engine produced.

  The trainer renders each record through `rise_jax.chat.render`; the tokens of the trained assistant span
  (its end-of-turn token stripped) are compared with the sampled ids (eos stripped). Teacher text (ids None) is
  not measured. A non-zero fraction means the trainer fits slightly different token sequences than were sampled.
  """
  eos = tuple(tokenizer.eos_token_ids)
  measured = differ = 0
  examples = []
  for record, ids in zip(records, sampled_ids):
    if ids is None:
      continue
    rendered = chat.render(tokenizer, record["messages"])
    last = len(record["messages"]) - 1
    spans = [(s, e) for m, s, e in rendered.assistant_spans if m == last]
    if not spans:
      raise ValueError(f"record {record['id']}: the rendered chat has no span for the trained message")
    start, end = spans[0]
    measured += 1
    if _strip_eos(rendered.ids[start:end], eos) != _strip_eos(ids, eos):
      differ += 1
      if len(examples) < 5:
        examples.append(record["id"])
  return {"measured": measured, "differ": differ, "fraction": differ / measured if measured else 0.0,
          "examples": examples}


def weight_histogram(weights: Sequence[float], path: pathlib.Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.hist(list(weights) or [0.0], bins=50)
  ax.set_xlabel("example weight")
  ax.set_ylabel("examples")
  ax.set_title(title)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  atomic_write_bytes(path, buffer.getvalue())


def write_dataset(conversion: Conversion, out_dir: pathlib.Path, *, options: ConversionOptions,
                  reward_values: Sequence[float], tokenizer=None, extra: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
  """Write data/, summary.{json,md} and weights_hist.png under `out_dir`; returns the summary dict."""
  out_dir = pathlib.Path(out_dir)
  records = conversion.records
  sha = write_records(records, out_dir / "data" / DATA_FILE)
  stats = conversion.stats.to_dict()
  observed = {float(r["meta"]["reward"]) for r in records}
  drift = token_drift(records, conversion.sampled_ids, tokenizer) if tokenizer is not None else None
  weights = [float(r["weight"]) for r in records]
  summary = {
      "schema": SFT_SCHEMA,
      "version": options.iteration,
      "num_records": len(records),
      "sha256": sha,
      "options": dataclasses.asdict(options),
      "counts": stats,
      "weight_table": weight_table(set(reward_values) | observed, options.weighting, options.tau),
      "sum_weights": sum(weights),
      "token_drift": drift,
      **(extra or {}),
  }
  manifest = {k: summary[k] for k in ("schema", "version", "num_records", "sha256", "options")}
  atomic_write_json(out_dir / "data" / "manifest.json", manifest)
  atomic_write_json(out_dir / "summary.json", summary)
  atomic_write_text(out_dir / "summary.md", summary_markdown(summary))
  weight_histogram(weights, out_dir / "weights_hist.png",
                   f"iteration {options.iteration}: {len(records)} examples")
  return summary


def summary_markdown(summary: dict[str, Any]) -> str:
  c, o = summary["counts"], summary["options"]
  lines = [
      f"# Training set, iteration {summary['version']}",
      "",
      f"{summary['num_records']} records (`{summary['schema']}`, sha256 `{summary['sha256'][:12]}`) from "
      f"{c['episodes']} episodes / {c['actions']} chosen actions; criteria `{o['criteria']}`, dedupe "
      f"{o['dedupe']}, only_success {o['only_success']}, weighting `{o['weighting']}` (tau {o['tau']}), "
      f"single_turn {o['single_turn']}.",
      "",
      f"- removed by dedupe: {c['removed_duplicate']} duplicate, {c['removed_empty']} empty actions "
      "(each with the feedback after it)",
      f"- episodes skipped by only_success: {c['episodes_skipped_only_success']}",
      f"- sum of weights: {summary['sum_weights']:.2f}",
  ]
  drift = summary.get("token_drift")
  if drift is not None:
    lines.append(f"- token drift: {drift['differ']} of {drift['measured']} sampled actions re-tokenise differently "
                 f"({100 * drift['fraction']:.2f}%)")
  lines += ["", "| criterion | examples |", "|---|---|"]
  lines += [f"| {k}{' (used)' if k == o['criteria'] else ''} | {v} |" for k, v in c["kept_per_criterion"].items()]
  lines += ["", "| reward | weight | examples |", "|---|---|---|"]
  for r, w in summary["weight_table"].items():
    lines.append(f"| {r} | {w:.4g} | {c['examples_per_reward'].get(r, 0)} |")
  lines += ["", "| position in episode | examples |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in sorted(c["examples_per_turn"].items(), key=lambda kv: int(kv[0]))]
  return "\n".join(lines) + "\n"
