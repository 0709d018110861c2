"""Run every variant of one toy ablation (configs/ablation_<name>.py) and write one comparison table.

    python experiments/ablations.py criteria               # runs/toy_criteria_<variant>/, table to runs/
    python experiments/ablations.py weighting --seed 1
    python experiments/ablations.py variants --split dev   # tuning: the dev split, never test

Each variant is one `python -m rise_jax.run` (resumable); the table has one row per variant and model (the
boosted model is shared by construction: same seed, same boost) with m1@t1, mk@t1, m1@tk, p1@tk, pk@t1 and the two
differences the paper's claims are about.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
  from rise_jax.pipeline import recipes
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("ablation", choices=sorted(recipes.ABLATIONS))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="runs")
  parser.add_argument("--split", choices=("test", "dev"), default="test", help="the split every model is evaluated on")
  args = parser.parse_args()
  rows = []
  for variant in recipes.ABLATIONS[args.ablation]:
    suffix = "" if args.split == "test" else f"_{args.split}"
    out = (REPO / args.out / f"toy_{args.ablation}_{variant}_seed{args.seed}{suffix}").resolve()
    cmd = [sys.executable, "-m", "rise_jax.run", f"--config=configs/ablation_{args.ablation}.py:{variant}",
           f"--config.seed={args.seed}", f"--config.eval.split={args.split}", f"--config.output_dir={out}"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    config = json.loads((out / "config.json").read_text())
    k, t = config["eval"]["parallel_k"], config["eval"]["turns"]
    names = ["m1@t1", f"m{k}@t1", f"m1@t{t}", f"p1@t{t}", f"p{k}@t1"]
    for stage in sorted(p.parent for p in out.glob("iter_*/**/eval/metrics.json")):
      m = json.loads((stage / "metrics.json").read_text())
      label = str(stage.relative_to(out))
      rows.append([variant, label] + [f"{100 * m[n]:.1f}" for n in names]
                  + [f"{100 * (m[names[3]] - m[names[0]]):+.1f}", f"{100 * (m[names[2]] - m[names[1]]):+.1f}"])
  header = ["variant", "model", *names, "p1@tk - m1@t1", "m1@tk - mk@t1"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
  text = f"Ablation `{args.ablation}`, seed {args.seed} (% of the {args.split} problems)\n\n" + "\n".join(lines)
  print(text)
  (REPO / args.out / f"ablation_{args.ablation}_seed{args.seed}{suffix}.md").write_text(text + "\n")


if __name__ == "__main__":
  main()
