"""Seconds per grade() call on the adversarial responses of tests/grader_inputs.py, every grader and mode.

  python benchmarks/grader_worst_case.py                  # this checkout
  python benchmarks/grader_worst_case.py --code DIR       # the rise_jax under DIR (e.g. an export of an old commit)

Each call runs in its own process, killed after --timeout seconds (earlier graders took minutes on some).
"""

import argparse
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDS = {"gsm8k": "#### 18", "math": "\\boxed{\\frac{1}{2}}", "toy": "1*2=2,3+2=5"}
_ONE_CALL = """
import sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from grader_inputs import LONG
from rise_jax.tasks.graders import grade
grade("math", "\\\\boxed{1}", "\\\\boxed{2}", "robust")  # sympy / math-verify imported outside the timing
start = time.perf_counter()
try:
  reward = grade(sys.argv[4], LONG[sys.argv[3]], sys.argv[6], sys.argv[5])
except Exception as e:
  reward = type(e).__name__
print(f"{time.perf_counter() - start:.3f} s, {reward}")
"""


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--code", default=str(ROOT), help="directory holding the rise_jax package to time")
  parser.add_argument("--timeout", type=float, default=30.0)
  parser.add_argument("--only", default="", help="time only inputs whose name contains this")
  args = parser.parse_args()
  sys.path.insert(0, str(ROOT / "tests"))
  from grader_inputs import LONG

  print("| response | grader | mode | time, reward |\n|---|---|---|---|")
  for name in LONG:
    if args.only not in name:
      continue
    for task in GOLDS:
      for mode in ("paper", "robust"):
        cmd = [sys.executable, "-c", _ONE_CALL, args.code, str(ROOT / "tests"), name, task, mode, GOLDS[task]]
        try:
          out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout).stdout.strip()
        except subprocess.TimeoutExpired:
          out = f"> {args.timeout:.0f} s (killed)"
        print(f"| {name} | {task} | {mode} | {out.splitlines()[-1] if out else 'no output'} |", flush=True)


if __name__ == "__main__":
  main()
