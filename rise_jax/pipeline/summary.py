"""The final summary of a RISE run: every evaluated model in the paper's Table 1 layout (through
`rise_jax.rise.report.write_summary`: intervals, paired differences, accuracy_vs_turn.png), plus what only the
loop knows: the generated tokens, tokens/s and the wall-clock split between collection, training and evaluation of
each iteration.

Reads only the run directory (each eval stage's metrics.json, each stage's DONE marker), so it can be rebuilt at
any time; `rise_jax.run` rewrites it at the end of every invocation.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

from rise_jax.files import atomic_write_json, atomic_write_text, read_json
from rise_jax.pipeline import rundir


def model_label(stage: str, config) -> str:
  """Row name of an eval stage's model in the tables."""
  if stage == "iter_0/eval":
    return "iter_0 (base + boost)" if config.rise.boost else "iter_0 (base)"
  it = stage.split("/")[0]
  return f"{it} single-turn control" if "/control/" in stage else f"{it} RISE"


def comparisons(stage_names: Sequence[str], config) -> list[tuple[str, str]]:
  """Row pairs (a, b) whose paired differences a - b the summary reports: each RISE iteration against its
  single-turn control, iter_0 (the boost) and the RISE iteration before it, of the stages evaluated (rows that
  merely sit next to each other, a control and the next RISE iteration, are not compared)."""
  out = []
  rise = [name for name in stage_names if name != "iter_0/eval" and not name.endswith("/control/eval")]
  for i, name in enumerate(rise):
    others = [name.replace("/eval", "/control/eval"), "iter_0/eval"] + rise[i - 1:i]
    out += [(model_label(name, config), model_label(other, config)) for other in others if other in stage_names]
  return list(dict.fromkeys(out))


def headline(config) -> list[str]:
  """Table 1 columns: m1@t1, mk@t1 (sample-matched parallel), m1@tk, p1@tk (oracle), pk@t1."""
  k, t = config.eval.parallel_k, config.eval.turns
  return ["m1@t1", f"m{k}@t1", f"m1@t{t}", f"p1@t{t}", f"p{k}@t1"]


def _load(path: pathlib.Path) -> dict[str, Any] | None:
  if not path.exists():
    return None
  return rundir.read_done(path) if path.name == rundir.DONE_FILE else read_json(
      path, "delete it and re-run the same command")


def compute_table(stages: Sequence[Any], root: pathlib.Path) -> list[dict[str, Any]]:
  """Per iteration: seconds in collection / training / evaluation, decode tokens and sampling tokens/s."""
  rows: dict[int, dict[str, Any]] = {}
  for stage in stages:
    done = _load(root / stage.name / "DONE")
    if done is None:
      continue
    row = rows.setdefault(stage.iteration, {"iteration": stage.iteration, "collect_s": 0.0, "train_s": 0.0,
                                            "eval_s": 0.0, "decode_tokens": 0, "sampling_s": 0.0,
                                            "train_tokens": 0, "rate_tokens": 0})
    seconds = float(done.get("seconds", 0.0))
    if stage.kind in ("collect", "boost_data"):
      row["collect_s"] += seconds
      _add_sampling(row, done, "sampling_seconds_this_run")
    elif stage.kind == "train":
      row["train_s"] += seconds
      row["train_tokens"] += int(done.get("tokens") or 0)
    else:
      row["eval_s"] += seconds
      _add_sampling(row, done, "eval_seconds_this_run")
  for row in rows.values():
    rate_tokens = row.pop("rate_tokens")
    row["tokens_per_s"] = rate_tokens / row["sampling_s"] if row["sampling_s"] > 0 else None
  return [rows[k] for k in sorted(rows)]


def _add_sampling(row: dict[str, Any], done: dict[str, Any], seconds_key: str) -> None:
  """Decode tokens of the stage's whole log (a resumed stage sampled part of it in earlier invocations; DONE
  markers older than that total have only this invocation's); tokens/s from this invocation's tokens and time."""
  this_run = int(done.get("decode_tokens_this_run") or 0)
  row["decode_tokens"] += int(done.get("decode_tokens", this_run) or 0)
  row["rate_tokens"] += this_run
  row["sampling_s"] += float(done.get(seconds_key) or 0.0)


def compute_markdown(rows: Sequence[dict[str, Any]]) -> str:
  lines = ["## Compute per iteration", "",
           "Seconds of each stage as run (a resumed stage counts its last invocation only); decode tokens of "
           "collection and evaluation (all invocations) and the engine's tokens/s (last invocation); tokens seen "
           "by training (all invocations).", "",
           "| iteration | collect s | train s | eval s | decode tokens | sampling tokens/s | train tokens |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    tps = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
    lines.append(f"| {r['iteration']} | {r['collect_s']:.1f} | {r['train_s']:.1f} | {r['eval_s']:.1f} | "
                 f"{r['decode_tokens']} | {tps} | {r['train_tokens']} |")
  return "\n".join(lines) + "\n"


# summary.md sections the terminal leaves out (rows per model or comparison and turn pair): read in the file.
FILE_ONLY_SECTIONS = ("Turn to turn without oracle (SCoRe's metrics)", "SCoRe's metrics, paired differences")


def terminal_markdown(md: str) -> str:
  """summary.md as the command prints it: every section but FILE_ONLY_SECTIONS (named at the end)."""
  head, *sections = md.split("\n## ")
  kept = [s for s in sections if not s.startswith(FILE_ONLY_SECTIONS)]
  left_out = [s.split("\n", 1)[0] for s in sections if s.startswith(FILE_ONLY_SECTIONS)]
  out = "\n## ".join([head, *kept])
  return out + "".join(f"\n({name}: summary.md)\n" for name in left_out)


def write_run_summary(config, root: pathlib.Path, stages: Sequence[Any]) -> dict[str, Any]:
  """summary.md / summary.json / accuracy_vs_turn.png at the top of the run directory; returns the summary."""
  from rise_jax.rise import report
  root = pathlib.Path(root)
  rows, evaluated = {}, []
  for stage in stages:
    if stage.kind == "eval" and (root / stage.name / "DONE").exists():
      evaluated.append(stage.name)
      metrics = _load(root / stage.name / "metrics.json")
      if metrics is None:  # the loop recomputes a lost one before this; a summary rebuilt by hand must not guess
        raise FileNotFoundError(f"{root / stage.name / 'metrics.json'}: missing though {stage.name} is done; "
                                "re-run the same command to recompute it")
      rows[model_label(stage.name, config)] = metrics
  compute = compute_table(stages, root)
  written = {}
  if rows:
    written = report.write_summary(rows, root, title=f"{config.name}: RISE", seed=config.seed,
                                   comparisons=comparisons(evaluated, config))
  summary = _load(root / "summary.json") if rows else {}
  summary["compute"] = compute
  summary["headline"] = headline(config)
  atomic_write_json(root / "summary.json", summary)
  md = (root / "summary.md").read_text() if rows else f"# {config.name}: RISE\n"
  md = md.rstrip("\n") + "\n\n" + compute_markdown(compute)
  atomic_write_text(root / "summary.md", md)
  summary["table_md"] = terminal_markdown(md)
  summary["plots"] = [str(p) for name, p in written.items() if name.endswith(".png")]
  return summary
