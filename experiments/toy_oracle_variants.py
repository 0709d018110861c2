"""The dev-split variants behind docs/toy.md's "collecting without an oracle" table: the toy recipe's iteration 1,
then self-distillation iterations collected with or without an oracle, from one fixed boosted checkpoint.

    python -m rise_jax.run --config=experiments/toy_oracle_variants.py:<variant> \
        --config.model.hf_path=runs/toy_seed0/iter_0/train/hf --config.tokenizer.path=runs/toy_seed0/tokenizer \
        --config.output_dir=runs/toy_variant_<variant>

Variants: `oracle2` (2 iterations, Algorithm 1 collection), `no_oracle2` (iteration 2 without an oracle), `oracle3`,
`no_oracle3` (iterations 2-3 without an oracle). Best-of-8 at turn 2 throughout (what the table measured); no
single-turn controls; the boost is the given checkpoint, evaluated on the dev split like every later model.
"""

from rise_jax.config import finalize
from rise_jax.pipeline import recipes

VARIANTS = {"oracle2": (2, ()), "no_oracle2": (2, (2,)), "oracle3": (3, ()), "no_oracle3": (3, (2, 3))}


def get_config(variant: str = "no_oracle3"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; known: {list(VARIANTS)}")
  iterations, without_oracle = VARIANTS[variant]
  c = recipes.toy()
  c.name = f"toy_variant_{variant}"
  c.output_dir = f"runs/{c.name}"
  c.model.source = "hf"                   # model.hf_path / tokenizer.path: the boosted checkpoint (command line)
  c.rise.boost = False
  c.rise.boost_validate_every = None
  c.rise.boost_stop_accuracy = None
  c.rise.single_turn_control = False
  c.rise.evaluate = "all"
  c.eval.split = "dev"
  c.rise.iterations = iterations
  first = tuple(o for o in c.rise.iteration_overrides if o.startswith("1:"))  # iteration 1 as in the recipe
  c.rise.iteration_overrides = first + tuple(
      f"{t}:collect.{field}=False" for t in without_oracle for field in ("oracle", "dedupe"))
  return finalize(c)
