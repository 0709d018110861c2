"""Where a train step's time goes: a `jax.profiler` trace of `benchmarks/train_step.py`'s rise_jax step, summed
per XLA op and mapped back to the jax operation that produced it (from the optimized HLO's metadata).

    python benchmarks/profile_train_step.py --size 100m --batch 1 --seq 512
    python benchmarks/profile_train_step.py --size tiny --batch 8 --seq 256 --top 30

Prints the op time per step by fusion kind and by source operation (e.g. `bld,df->blf/dot_general`, `pad`,
`slice`). Op times are summed over XLA's thunks, which may overlap on several cores, so the total can exceed the
step's wall time. The trace directory (`--out`) also opens in TensorBoard's profile plugin or Perfetto.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="100m", choices=("toy", "tiny", "100m", "1b"))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--steps", type=int, default=2, help="steps traced (after two warm-up steps)")
  parser.add_argument("--top", type=int, default=25, help="source operations listed")
  parser.add_argument("--out", default=None, help="trace + HLO dump directory (default: a temporary one)")
  return parser.parse_args()


def hlo_sources(dump_dir: pathlib.Path) -> dict[str, str]:
  """XLA op name -> the jax operation in its metadata (`op_name`), with jit/transpose wrappers stripped."""
  out = {}
  pattern = re.compile(r'\s+(?:ROOT )?%([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"')
  for path in dump_dir.glob("*after_optimizations.txt"):
    for line in path.read_text().splitlines():
      m = pattern.match(line)
      if m:
        # Drop the wrappers jax puts around an op's name (`transpose(jvp(...))`, `while/body/`), keep the op itself.
        source = re.sub(r"\b(jit|jvp|transpose|checkpoint|remat|rematted_computation)\(|\)", "", m.group(2))
        source = re.sub(r"\b(while|body|closed_call|cond|branch_\d+_fun)/", "", source)
        out[m.group(1)] = re.sub(r"/+", "/", source).strip("/") or "?"
  return out


def op_times(trace_dir: pathlib.Path) -> collections.Counter:
  """Microseconds per XLA op name, summed over the trace."""
  (path,) = glob.glob(str(trace_dir / "**" / "*.trace.json.gz"), recursive=True)[-1:]
  events = json.load(gzip.open(path))["traceEvents"]
  times = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") == "X" and (e.get("args") or {}).get("hlo_op") == name:
      times[name] += e.get("dur", 0)
  return times


def main():
  args = _parse_args()
  out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="rise_jax_profile_"))
  dump = out / "hlo"
  # The dump flag must be set before jax initialises its backend.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step.*")
  import jax
  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  import train_step as bench

  step, _ = bench.jax_step(bench.SIZES[args.size], args.batch, args.seq, args.dtype)
  step(), step()
  jax.profiler.start_trace(str(out / "trace"), create_perfetto_trace=True)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    step()
  wall = (time.perf_counter() - t0) / args.steps
  jax.profiler.stop_trace()

  times = op_times(out / "trace")
  sources = hlo_sources(dump)
  total = sum(times.values())
  by_kind, by_source = collections.Counter(), collections.Counter()
  for name, us in times.items():
    kind = name.split(".")[0]
    by_kind[kind] += us
    by_source[(kind, sources.get(name, "?"))] += us
  per_step = lambda us: us / 1e3 / args.steps  # noqa: E731
  print(f"{args.size} batch {args.batch} x seq {args.seq} {args.dtype}: {wall * 1e3:.0f} ms/step wall, "
        f"{per_step(total):.0f} ms/step summed over XLA ops (trace: {out / 'trace'})")
  print("\nby fusion kind:")
  for kind, us in by_kind.most_common(12):
    print(f"  {per_step(us):8.1f} ms  {us / total:6.1%}  {kind}")
  print("\nby source operation:")
  for (kind, source), us in by_source.most_common(args.top):
    print(f"  {per_step(us):8.1f} ms  {us / total:6.1%}  {kind:28s} {source[:90]}")


if __name__ == "__main__":
  main()
