"""Render metrics (rise_jax.rise.metrics) as files: metrics.json, report.md in the paper's Table 1 layout, and plots.

`write_report(metrics, out_dir)` writes one evaluation's `metrics.json`, `report.md` and PNGs;
`write_summary(per_iteration_metrics, out_dir)` writes the cross-iteration `summary.md`, `summary.json` and
`accuracy_vs_turn.png` of a RISE run (contracts §6); `python -m rise_jax.rise.report --sequential ... --parallel ...
--out DIR` recomputes metrics and report offline from rollout logs alone. Every file is written atomically. Plots use
matplotlib's object API on an Agg canvas, so importing this module never changes the process's pyplot backend.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
from typing import Any, Mapping, Sequence

from rise_jax.config import TIE_BREAKS
from rise_jax.files import atomic_write_bytes, atomic_write_json
from rise_jax.rise import metrics as metrics_lib
from rise_jax.rise.algorithm import reward_range
from rise_jax.rollout import log as rollout_log
from rise_jax.tasks import get_task

_PLOT_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")


def _save_figure(fig, path: pathlib.Path):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # local: matplotlib only when plotting

  FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
  atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------- formatting


def _pct(x: float | None) -> str:
  return "–" if x is None else f"{100 * x:.1f}"


def _with_ci(m: Mapping[str, Any], name: str) -> str:
  value = m.get(name)
  if value is None:
    return "–"
  ci = m.get("ci95", {}).get(name)
  return f"{_pct(value)} [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else _pct(value)


def _value_ci(value: float | None, ci: Sequence[float] | None, signed: bool = False) -> str:
  """A fraction as % with its interval; signed for differences."""
  if value is None:
    return "–"
  fmt = (lambda x: f"{100 * x:+.1f}") if signed else _pct
  return fmt(value) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def _delta(m: Mapping[str, Any], name: str, base: str) -> str:
  if m.get(name) is None or m.get(base) is None:
    return ""
  return f" ({100 * (m[name] - m[base]):+.1f})"


def _budget(m: Mapping[str, Any]) -> int | None:
  """The sample budget k of the Table 1 columns: the largest k run both sequentially and in parallel."""
  turns, k = m.get("turns"), m.get("parallel_k")
  if turns and k:
    return min(turns, k)
  return turns or k


def table1_cells(m: Mapping[str, Any]) -> dict[str, str]:
  """The paper's Table 1 row for one model: m1@t1, mk@t1, m1@tk (w/o oracle), p1@tk, pk@t1 (w/ oracle)."""
  k = _budget(m)
  if k is None:
    return {}
  return {
      "m1@t1": _with_ci(m, "m1@t1"),
      f"m{k}@t1": _with_ci(m, f"m{k}@t1") + _delta(m, f"m{k}@t1", "m1@t1"),
      f"m1@t{k}": _with_ci(m, f"m1@t{k}") + _delta(m, f"m1@t{k}", "m1@t1"),
      f"p1@t{k}": _with_ci(m, f"p1@t{k}"),
      f"p{k}@t1": _with_ci(m, f"p{k}@t1"),
  }


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines


def _table1(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """Table 1 with one row per model / iteration (all rows must share the budget k)."""
  budgets = {_budget(m) for m in rows.values()}
  if len(budgets) != 1 or None in budgets:
    return [f"(no common sample budget across rows: {sorted(map(str, budgets))})"]
  k = budgets.pop()
  columns = ["m1@t1", f"m{k}@t1", f"m1@t{k}", f"p1@t{k}", f"p{k}@t1"]
  header = ["model", "w/o oracle: m1@t1", f"m{k}@t1 (parallel)", f"m1@t{k} (sequential)",
            f"w/ oracle: p1@t{k}", f"p{k}@t1"]
  return _table(header, [[name] + [table1_cells(m)[c] for c in columns] for name, m in rows.items()])


# ------------------------------------------------------------------------------------------------- report


def _report_md(m: Mapping[str, Any], title: str, plots: Sequence[str]) -> str:
  lines = [f"# {title}", ""]
  by_source = ", ".join(f"{n} {c}" for n, c in m.get("num_problems_by_source", {}).items())
  lines += [f"{m['num_problems']} problems ({by_source}); grader `{m.get('grader')}`"
            f"{' (re-graded)' if m.get('regraded') else ''}; majority-vote tie break `{m['tie_break']}`; "
            f"95% bootstrap intervals over problems ({m.get('bootstrap', {}).get('num_resamples')} resamples). "
            "Values in %.", ""]
  lines += ["## Table 1 (the paper's layout)", ""]
  lines += _table1({m.get("model", "this model"): m})
  lines += ["", "Deltas in parentheses are against m1@t1. mk@t1 is sample-matched with m1@tk, not compute-matched "
            "(see Compute)."]
  if m.get("m1@t1_per_draw"):
    draws = ", ".join(f"seed {s}: {_pct(v)}" for s, v in m["m1@t1_per_draw"].items())
    lines += [f"m1@t1 is the mean over {len(m['m1@t1_per_draw'])} independent draws ({draws})."]
  lines += [""]

  if m.get("paired"):
    lines += ["## Sequential vs parallel at the same sample budget (paired bootstrap)", ""]
    rows = []
    for name, d in m["paired"].items():
      ci = d["ci95"]
      rows.append([name, _pct(d["diff"]), f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "–",
                   f"{d['p_value']:.3f}" if d["p_value"] is not None else "–", d["num_problems"]])
    lines += _table(["difference", "Δ", "95% CI", "p", "problems"], rows) + [""]

  if m.get("per_turn_accuracy") is not None:
    lines += ["## Turns (sequential run)", ""]
    turns = len(m["per_turn_accuracy"])
    ci = m["ci95"]["per_turn_accuracy"]
    rows = []
    for t in range(turns):
      row = [t + 1, f"{_pct(m['per_turn_accuracy'][t])} " + (f"[{_pct(ci[t][0])}, {_pct(ci[t][1])}]" if ci[t] else ""),
             m["per_turn_count"][t], _pct(m["per_turn_unparsable_rate"][t]),
             _with_ci(m, f"m1@t{t + 1}"), _with_ci(m, f"p1@t{t + 1}")]
      rows.append(row)
    lines += _table(["turn t", "accuracy at t", "episodes", "unparsable", "m1@t (vote over 1..t)",
                     "p1@t (any of 1..t)"], rows) + [""]
    if m.get("transitions"):
      rows = []
      for t, tr in enumerate(m["transitions"]):
        def at(key, i=t):
          vals, cis = m.get(key), m["ci95"].get(key)
          return _value_ci(vals[i] if vals else None, cis[i] if cis else None)
        rows.append([f"{t + 1}->{t + 2}", tr["c->c"], tr["c->i"], tr["i->c"], tr["i->i"], at("acc_given_wrong"),
                     at("fresh_acc_given_wrong"), at("acc_given_right"), at("repeat_rate")])
      lines += _table(["turns", "c->c", "c->i", "i->c", "i->i", "acc t+1 given t wrong",
                       "fresh sample, same problems", "acc t+1 given t right", "answer repeats"], rows)
      lines += ["", "A retry beats a fresh first-turn sample on the problems it failed when `acc t+1 given t wrong` "
                "> `fresh sample`: the condition for sequential turns to beat parallel sampling. "
                "`acc t+1 given t right` is how often a right answer survives the failure message.", ""]

  if m.get("score") and m.get("per_turn_accuracy") is not None:
    lines += ["## Turn to turn without oracle (SCoRe's metrics)", ""] + _score_md([("", m["score"])]) + [""]

  unsolved = m.get("unsolved_by_pass@B")
  if unsolved:
    lines += [f"## Problems unsolved by pass@{unsolved['B']} at turn 1 (paper Fig. 5)", "",
              f"{unsolved['num_unsolved']} problems have no correct answer among {unsolved['B']} parallel "
              "first-turn samples. Fraction of them solved within k sequential turns:", ""]
    rows = [[k + 1, _pct(v) + (f" [{_pct(c[0])}, {_pct(c[1])}]" if c else "")]
            for k, (v, c) in enumerate(zip(unsolved["solved_by_turn"], unsolved["ci95"]))]
    lines += _table(["k", "solved"], rows) + [""]

  if m.get("compute"):
    lines += ["## Compute", ""]
    rows = [[name, c["episodes"], c["samples"], c["prefill_tokens"], c["decode_tokens"],
             f"{c['prefill_tokens_per_problem']:.0f}" if c["prefill_tokens_per_problem"] is not None else "–",
             f"{c['decode_tokens_per_problem']:.0f}" if c["decode_tokens_per_problem"] is not None else "–",
             c["candidates_with_unknown_tokens"]] for name, c in m["compute"].items()]
    lines += _table(["protocol", "episodes", "samples", "prefill tokens", "decode tokens", "prefill / problem",
                     "decode / problem", "samples w/o token count"], rows) + [""]
    errors = {name: c.get("grader_errors", 0) for name, c in m["compute"].items()}
    if any(errors.values()):
      lines += ["**Grader errors:** " + ", ".join(f"{name} {n}" for name, n in errors.items() if n)
                + " samples graded 0 because the grader raised (`grader_error` in the rollout log).", ""]

  if m.get("tie_fraction"):
    lines += ["## Majority votes", ""]
    rows = [[name, _pct(frac), _pct(m["all_unparsable_fraction"].get(name))]
            for name, frac in m["tie_fraction"].items()]
    lines += _table(["vote", "tied", "no parsable answer (counted wrong)"], rows)
    lines += ["", f"Clusters whose members were graded differently: {m.get('vote_inconsistent_clusters', 0)}.", ""]

  lines += ["## Sources", ""]
  sources = sorted(set(m.get("sources", {}).values()))
  lines += [f"- `{s}`: " + ", ".join(n for n, v in m["sources"].items() if v == s) for s in sources]
  if m.get("num_torn_lines"):
    lines += [f"- torn last lines ignored: {m['num_torn_lines']}"]
  for note in m.get("notes", []):
    lines += [f"- note: {note}"]
  if plots:
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
  return "\n".join(lines) + "\n"


_SCORE_HEADER = ["turns", "episodes", "acc t", "acc t+1", "Δ(t, t+1)", "Δi→c", "Δc→i"]


def _score_md(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
  """SCoRe's metrics of one or more models (name, metrics["score"]) as one table, unavailable ones said so."""
  named = len(rows) > 1 or rows[0][0]
  table_rows, missing = [], []
  for name, score in rows:
    if not score.get("available"):
      missing.append(f"{name + ': ' if named else ''}not available ({score.get('reason')}).")
      continue
    for i, pair in enumerate(score["pairs"]):
      cells = [_value_ci(score[k][i], score["ci95"][k][i], signed=k == "delta_t1_t2") for k in
               metrics_lib.SCORE_METRICS]
      table_rows.append(([name] if named else []) + [pair, score["num_episodes"][i]] + cells)
  lines = _table((["model"] if named else []) + _SCORE_HEADER, table_rows) + [""] if table_rows else []
  lines += missing + ([""] if missing else [])
  return lines + ["SCoRe (arXiv 2409.12917), from the sequential log without oracle: Δ(t, t+1) = acc t+1 − acc t "
                  "= Δi→c − Δc→i; Δi→c (Δc→i): fraction of episodes wrong (right) at t and right (wrong) at t+1. "
                  "95% bootstrap intervals over problems."]


def _new_figure(ncols: int = 1):
  from matplotlib.figure import Figure

  fig = Figure(figsize=(5.2 * ncols, 3.8))
  axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
  return fig, axes


def _band(ax, xs, values, cis, label, color, style="-"):
  points = [(x, v, c) for x, v, c in zip(xs, values, cis or [None] * len(xs)) if v is not None]
  if not points:
    return
  ax.plot([p[0] for p in points], [100 * p[1] for p in points], style, marker="o", color=color, label=label)
  banded = [p for p in points if p[2]]
  if banded:
    ax.fill_between([p[0] for p in banded], [100 * p[2][0] for p in banded], [100 * p[2][1] for p in banded],
                    color=color, alpha=0.15, linewidth=0)


def _series(m: Mapping[str, Any], pattern: str, ks: Sequence[int]):
  names = [pattern.format(k=k) for k in ks]
  return [m.get(n) for n in names], [m.get("ci95", {}).get(n) for n in names]


def _plot_turns(m: Mapping[str, Any], path: pathlib.Path):
  turns = len(m["per_turn_accuracy"])
  ks = list(range(1, turns + 1))
  fig, (ax,) = _new_figure()
  _band(ax, ks, m["per_turn_accuracy"], m["ci95"]["per_turn_accuracy"], "accuracy at turn t", _PLOT_COLORS[0])
  _band(ax, ks, *_series(m, "m1@t{k}", ks), "m1@tk (vote, no oracle)", _PLOT_COLORS[1])
  _band(ax, ks, *_series(m, "p1@t{k}", ks), "p1@tk (oracle)", _PLOT_COLORS[2], "--")
  ax.set(xlabel="turn", ylabel="accuracy (%)", title="Accuracy over turns (95% CI bands)", xticks=ks)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  _save_figure(fig, path)


def _plot_seq_vs_parallel(m: Mapping[str, Any], path: pathlib.Path):
  ks = list(range(1, _budget(m) + 1))
  fig, (ax,) = _new_figure()
  first = [m.get("m1@t1")] + [None] * (len(ks) - 1)
  mk, mk_ci = _series(m, "m{k}@t1", ks[1:])
  pk, pk_ci = _series(m, "p{k}@t1", ks[1:])
  base_ci = [m["ci95"].get("m1@t1")]
  _band(ax, ks, *_series(m, "m1@t{k}", ks), "m1@tk: k sequential turns, vote", _PLOT_COLORS[1])
  _band(ax, ks, [first[0]] + mk, base_ci + mk_ci, "mk@t1: k parallel samples, vote", _PLOT_COLORS[0])
  _band(ax, ks, *_series(m, "p1@t{k}", ks), "p1@tk: k turns, oracle", _PLOT_COLORS[1], "--")
  _band(ax, ks, [first[0]] + pk, base_ci + pk_ci, "pk@t1: k samples, any correct", _PLOT_COLORS[0], "--")
  ax.set(xlabel="samples k", ylabel="accuracy (%)", title="Sequential vs parallel at equal samples", xticks=ks)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  _save_figure(fig, path)


def _plot_transitions(m: Mapping[str, Any], path: pathlib.Path):
  pairs = m["transitions"]
  labels = [f"{t + 1}->{t + 2}" for t in range(len(pairs))]
  fig, (ax,) = _new_figure()
  bottom = [0.0] * len(pairs)
  colors = {"c->c": "#2ca02c", "i->c": "#98df8a", "c->i": "#ff9896", "i->i": "#d62728"}
  for key in ("c->c", "i->c", "c->i", "i->i"):
    totals = [sum(p.values()) or 1 for p in pairs]
    heights = [100 * p[key] / n for p, n in zip(pairs, totals)]
    ax.bar(labels, heights, bottom=bottom, color=colors[key], label=key)
    bottom = [b + h for b, h in zip(bottom, heights)]
  ax.set(xlabel="turn pair", ylabel="episodes (%)", title="Transitions between consecutive turns")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  _save_figure(fig, path)


def write_report(m: Mapping[str, Any], out_dir: str | os.PathLike, *, title: str = "RISE evaluation",
                 plots: bool = True) -> dict[str, pathlib.Path]:
  """Write metrics.json, report.md and (when the data exist) accuracy_vs_turn.png, seq_vs_parallel.png,
  transitions.png into out_dir; returns name -> path of what was written."""
  out = pathlib.Path(out_dir)
  written = {"metrics.json": out / "metrics.json"}
  atomic_write_json(written["metrics.json"], m, allow_nan=False)
  figures = []
  if plots:
    if m.get("per_turn_accuracy"):
      figures.append(("accuracy_vs_turn.png", _plot_turns))
    if m.get("turns") and m.get("parallel_k") and _budget(m) >= 2:
      figures.append(("seq_vs_parallel.png", _plot_seq_vs_parallel))
    if m.get("transitions"):
      figures.append(("transitions.png", _plot_transitions))
  for name, plot in figures:
    plot(m, out / name)
    written[name] = out / name
  atomic_write_bytes(out / "report.md", _report_md(m, title, [n for n, _ in figures]).encode())
  written["report.md"] = out / "report.md"
  return written


# ------------------------------------------------------------------------------------------------ summary


def consecutive_comparisons(names: Sequence[str]) -> list[tuple[str, str]]:
  """(later, earlier) for each pair of consecutive rows: the summary's default comparisons."""
  return [(after, before) for before, after in zip(names, names[1:])]


def _iteration_differences(per_iteration: Mapping[str, Mapping[str, Any]], comparisons: Sequence[tuple[str, str]],
                           num_bootstrap: int, seed: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
  """Paired bootstrap differences a - b, for each (a, b) in `comparisons`, on the Table 1 metrics they share, and
  on SCoRe's metrics per turn pair where both have them (second dict)."""
  out, score = {}, {}
  for after, before in comparisons:
    a, b = per_iteration[after], per_iteration[before]
    if "per_problem" not in a or "per_problem" not in b:
      continue

    def diff(metric):
      try:
        va, vb = metrics_lib.per_problem_values(a, metric), metrics_lib.per_problem_values(b, metric)
      except KeyError:
        return None
      return metrics_lib.paired_difference(va, vb, num_bootstrap=num_bootstrap, seed=seed)

    k = _budget(a) if _budget(a) == _budget(b) else None
    candidates = ["m1@t1"] + ([f"m1@t{k}", f"p1@t{k}", f"m{k}@t1", f"p{k}@t1"] if k else [])
    for metric in dict.fromkeys(candidates):
      d = diff(metric)
      if d is not None:
        out[f"{after} - {before}: {metric}"] = d
    score[f"{after} - {before}"] = _score_difference(a, b, after, before, diff)
  return out, score


def _score_difference(a: Mapping[str, Any], b: Mapping[str, Any], name_a: str, name_b: str, diff) -> dict[str, Any]:
  """SCoRe's metrics of a minus b per turn pair both have, through `diff(table metric name)`."""
  for name, m in ((name_a, a), (name_b, b)):
    if not (m.get("score") or {}).get("available"):
      reason = (m.get("score") or {}).get("reason", "computed before SCoRe's metrics were reported")
      return {"available": False, "reason": f"{name}: {reason}"}
  pairs = range(1, min(len(a["score"]["pairs"]), len(b["score"]["pairs"])) + 1)
  out: dict[str, Any] = {"available": True, "pairs": [f"t{t}->t{t + 1}" for t in pairs]}
  for metric in metrics_lib.SCORE_METRICS:
    out[metric] = [diff(metrics_lib.score_table_names(t)[metric]) for t in pairs]
  return out


def _difference_row(name: str, d: Mapping[str, Any]) -> list:
  return [name, _pct(d["diff"]), f"[{_pct(d['ci95'][0])}, {_pct(d['ci95'][1])}]" if d["ci95"] else "–",
          f"{d['p_value']:.3f}" if d["p_value"] is not None else "–", d["num_problems"]]


def _plot_iterations(per_iteration: Mapping[str, Mapping[str, Any]], path: pathlib.Path):
  fig, (left, right) = _new_figure(2)
  for i, (name, m) in enumerate(per_iteration.items()):
    color = _PLOT_COLORS[i % len(_PLOT_COLORS)]
    if m.get("per_turn_accuracy"):
      ks = list(range(1, len(m["per_turn_accuracy"]) + 1))
      _band(left, ks, m["per_turn_accuracy"], m["ci95"]["per_turn_accuracy"], name, color)
      _band(right, ks, *_series(m, "m1@t{k}", ks), f"{name} m1@tk", color)
    if m.get("parallel_k"):
      ks = list(range(2, m["parallel_k"] + 1))
      _band(right, ks, *_series(m, "m{k}@t1", ks), f"{name} mk@t1", color, ":")
  left.set(xlabel="turn", ylabel="accuracy (%)", title="Accuracy at each turn")
  right.set(xlabel="samples k", ylabel="accuracy (%)", title="m1@tk (solid) vs mk@t1 (dotted)")
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  _save_figure(fig, path)


def write_summary(per_iteration_metrics: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike, *,
                  title: str = "RISE iterations", num_bootstrap: int = metrics_lib.DEFAULT_NUM_BOOTSTRAP,
                  seed: int = 0, plots: bool = True,
                  comparisons: Sequence[tuple[str, str]] | None = None) -> dict[str, pathlib.Path]:
  """Cross-iteration summary of a RISE run: summary.md (Table 1, one row per iteration, SCoRe's turn-to-turn
  metrics, and paired differences), summary.json and accuracy_vs_turn.png.

  per_iteration_metrics: iteration name (e.g. "iter_0 (base)", "iter_1") -> that iteration's metrics dict, in
  order. Differences need each dict's `per_problem` tables (present in every metrics.json compute_metrics wrote).
  comparisons: (a, b) row names whose paired differences a - b are reported (default: consecutive rows).
  """
  out = pathlib.Path(out_dir)
  rows = dict(per_iteration_metrics)
  comparisons = consecutive_comparisons(list(rows)) if comparisons is None else list(comparisons)
  unknown = sorted({n for pair in comparisons for n in pair} - set(rows))
  if unknown:
    raise ValueError(f"comparisons name rows {unknown} that are not among {list(rows)}")
  differences, score_differences = _iteration_differences(rows, comparisons, num_bootstrap, seed)
  keys = ("m1@t1", "per_turn_accuracy", "num_problems", "grader", "tie_break", "turns", "parallel_k")
  summary = {
      "iterations": list(rows),
      "metrics": {name: {**{k: m.get(k) for k in keys},
                         **{k: v for k, v in m.items() if _is_headline(k)},
                         "ci95": {k: v for k, v in m.get("ci95", {}).items() if _is_headline(k)},
                         **({"score": m["score"]} if "score" in m else {})}
                  for name, m in rows.items()},
      "differences": differences,
      "score_differences": score_differences,
  }
  written = {"summary.json": out / "summary.json", "summary.md": out / "summary.md"}
  atomic_write_json(written["summary.json"], summary, allow_nan=False)
  lines = [f"# {title}", "", "Values in %, 95% bootstrap intervals over problems.", "", "## Table 1", ""]
  lines += _table1(rows)
  if any(m.get("per_turn_accuracy") for m in rows.values()):
    turns = max(len(m.get("per_turn_accuracy") or []) for m in rows.values())
    lines += ["", "## Accuracy at each turn", ""]
    lines += _table(["iteration"] + [f"t{t}" for t in range(1, turns + 1)],
                    [[name] + [_pct(v) for v in (m.get("per_turn_accuracy") or [])] + ["–"] * (
                        turns - len(m.get("per_turn_accuracy") or [])) for name, m in rows.items()])
  scored = [(name, m["score"]) for name, m in rows.items() if m.get("score") and m.get("per_turn_accuracy")]
  if scored:
    lines += ["", "## Turn to turn without oracle (SCoRe's metrics)", ""] + _score_md(scored)
  if differences:
    lines += ["", "## Paired differences (paired bootstrap over shared problems)", ""]
    lines += _table(["difference", "Δ", "95% CI", "p", "problems"],
                    [_difference_row(name, d) for name, d in differences.items()])
  score_rows, score_missing = [], []
  for name, d in score_differences.items():
    if not d["available"]:
      score_missing.append(f"{name}: not available ({d['reason']}).")
      continue
    for i, pair in enumerate(d["pairs"]):
      score_rows += [_difference_row(f"{name}: {metric} {pair}", d[metric][i]) for metric in
                     metrics_lib.SCORE_METRICS if d[metric][i] is not None]
  if score_rows or score_missing:
    lines += ["", "## SCoRe's metrics, paired differences (paired bootstrap over shared problems)", ""]
    lines += (_table(["difference", "Δ", "95% CI", "p", "problems"], score_rows) if score_rows else [])
    lines += ([""] if score_rows and score_missing else []) + score_missing
  if plots and any(m.get("per_turn_accuracy") or m.get("parallel_k") for m in rows.values()):
    _plot_iterations(rows, out / "accuracy_vs_turn.png")
    written["accuracy_vs_turn.png"] = out / "accuracy_vs_turn.png"
    lines += ["", "![accuracy_vs_turn.png](accuracy_vs_turn.png)"]
  atomic_write_bytes(written["summary.md"], ("\n".join(lines) + "\n").encode())
  return written


def _is_headline(key: str) -> bool:
  """m{k}@t{j} / p{k}@t{j} metric names."""
  head, sep, tail = key.partition("@t")
  return bool(sep) and head[:1] in "mp" and head[1:].isdigit() and tail.isdigit()


# ---------------------------------------------------------------------------------------------------- CLI


def check_logs(sequential: Sequence[str], parallel: str | None, out: str) -> list[dict[str, Any]]:
  """Refuse what would silently merge into wrong numbers: logs of different models or config hashes, the same
  file or the same draw (seed) twice, a problem twice in one log, a log with no episodes, rewards outside the
  logged grader's range; and `out` naming a file. Returns the first log's records."""
  if pathlib.Path(out).exists() and not pathlib.Path(out).is_dir():
    raise ValueError(f"--out {out}: is a file; give a directory for metrics.json, report.md and the plots")
  paths = [*sequential, *([parallel] if parallel is not None else [])]
  seen: dict[tuple[int, int], str] = {}
  for path in paths:
    if not os.path.isfile(path):
      raise ValueError(f"{path}: no such file")
    st = os.stat(path)
    if (st.st_dev, st.st_ino) in seen:
      raise ValueError(f"{path}: the same file as {seen[st.st_dev, st.st_ino]}; each log counts once")
    seen[st.st_dev, st.st_ino] = path
  first, draws = None, {}
  for path in paths:
    header, records, _ = rollout_log.read_rollouts(path)
    if not records:
      raise ValueError(f"{path}: holds no episodes (a header only)")
    if first is None:
      first = (path, header, records)
    for key in ("model", "config_hash"):
      if header[key] != first[1][key]:
        raise ValueError(f"{path}:1: field {key!r}: {header[key]!r}, but {first[0]} has {first[1][key]!r}; "
                         "a report covers one model of one config")
    ids: dict[str, int] = {}
    for number, r in enumerate(records, start=2):
      if r["problem_id"] in ids:
        raise ValueError(f"{path}:{number}: problem {r['problem_id']!r} again (first at line {ids[r['problem_id']]}); "
                         "a duplicated record would count twice")
      ids[r["problem_id"]] = number
      allowed = reward_range(r["task"], r["protocol"]["grader"])
      for turn in r["turns"]:
        for j, c in enumerate(turn["candidates"]):
          if not min(allowed) <= c["reward"] <= max(allowed):
            raise ValueError(f"{path}:{number}: field 'turns[{turn['t'] - 1}].candidates[{j}].reward': "
                             f"{c['reward']} is outside the {r['protocol']['grader']} grader's range {list(allowed)}")
    if path in sequential:
      seed = records[0]["protocol"]["seed"]
      if seed in draws:
        raise ValueError(f"{path}: draw seed {seed} again (as in {draws[seed]}): the same draw counted twice")
      draws[seed] = path
  return first[2]



def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Recompute metrics and the report offline from rollout logs alone:

    python -m rise_jax.rise.report --sequential rollouts.jsonl --parallel rollouts_parallel.jsonl --out eval/
  """

  parser = argparse.ArgumentParser(prog="python -m rise_jax.rise.report", description=main.__doc__.split("\n")[0])
  parser.add_argument("--sequential", action="append", default=[],
                      help="a sequential rollout log; repeat for independent draws")
  parser.add_argument("--parallel", default=None, help="the parallel (k first-turn samples) rollout log")
  parser.add_argument("--out", required=True, help="directory for metrics.json, report.md and the plots")
  parser.add_argument("--grader", default=None, choices=("paper", "robust"),
                      help="re-grade under this mode (default: as logged)")
  parser.add_argument("--tie_break", default="earliest", choices=TIE_BREAKS)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_bootstrap", type=int, default=metrics_lib.DEFAULT_NUM_BOOTSTRAP)
  parser.add_argument("--title", default="RISE evaluation")
  args = parser.parse_args(argv)
  if not args.sequential and args.parallel is None:
    parser.error("give --sequential and/or --parallel")

  try:
    records = check_logs(args.sequential, args.parallel, args.out)
  except (ValueError, OSError) as e:  # RolloutLogError is a ValueError
    parser.exit(2, f"{parser.prog}: error: {e}\n")
  task = get_task(records[0]["task"])  # answers_equivalent / re-grading need the task
  m = metrics_lib.metrics_from_logs(args.sequential or None, args.parallel, task, args.grader, args.tie_break,
                                    seed=args.seed, num_bootstrap=args.num_bootstrap)
  for path in write_report(m, args.out, title=args.title).values():
    print(path)
  return m


if __name__ == "__main__":
  main()
