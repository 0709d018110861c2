"""A training process launched by the trainer tests: one host of a two-process run, or a run to be SIGKILLed.

    python tests/train_worker.py SPEC_JSON
SPEC: {data, tokenizer, out_dir, result, process_id?, num_processes?, port?, stop_after_step?}. Writes the per-step
losses, the rows this process read and the final parameters' checksum to `result` (process 0 only for the
parameters).
"""

import faulthandler
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout, not the installed copy
from train_helpers import TINY, tiny_config  # noqa: E402


def main(spec):
  from rise_jax import chat
  from rise_jax import sharding as sharding_lib
  from rise_jax.models.build import build_model
  from rise_jax.train import data as data_lib
  from rise_jax.train import trainer as trainer_lib

  cfg = tiny_config(spec["tokenizer"], spec["out_dir"])
  cfg.unlock()
  if "process_id" in spec:
    cfg.distributed.initialize = True
    cfg.distributed.coordinator_address = f"127.0.0.1:{spec['port']}"
    cfg.distributed.num_processes = spec["num_processes"]
    cfg.distributed.process_id = spec["process_id"]
  cfg.lock()
  trainer_lib.initialize_distributed(cfg)
  mesh = sharding_lib.make_mesh(cfg.mesh.train)
  out = {"process_count": jax.process_count(), "num_devices": len(jax.devices()),
         "local_devices": len(jax.local_devices())}
  tokenizer = chat.load_tokenizer(spec["tokenizer"], "toy")
  model = build_model(TINY, mesh=mesh, seed=0)
  # No HF export here (importing transformers costs seconds per process); the in-process tests check it.
  result = trainer_lib.train(cfg, spec["data"], spec["out_dir"], model=model, tokenizer=tokenizer,
                             export_hf=False, stop_after_step=spec.get("stop_after_step"))
  out["losses"] = {m["step"]: m["loss"] for m in result.metrics}
  out["resumed_from"] = result.resumed_from
  # The rows of each planned step this process materialised (the batch axis is sharded over processes).
  sharding = jax.sharding.NamedSharding(mesh, trainer_lib.BATCH_SPEC)
  examples, _ = data_lib.encode_records(data_lib.as_records(spec["data"]), tokenizer, cfg.train.max_length)
  steps = data_lib.plan([e.length for e in examples], epochs=1, seed=cfg.seed, global_batch=cfg.train.global_batch,
                        micro_batch=cfg.train.micro_batch, row_multiple=mesh.shape["data"] * mesh.shape["fsdp"],
                        max_length=cfg.train.max_length, packing=False)
  out["rows"] = [[s.shape[1], *data_lib.host_rows(sharding, s.shape).indices(s.shape[1])[:2]] for s in steps]
  lm_head = np.asarray(jax.experimental.multihost_utils.process_allgather(result.model.lm_head[...], tiled=True))
  out["lm_head"] = lm_head.tolist()
  if "process_id" in spec and spec.get("restore"):
    again = trainer_lib.train(cfg, spec["data"], spec["out_dir"], model=model, tokenizer=tokenizer,
                              export_hf=False)
    out["restored_step"] = again.resumed_from
    restored = jax.experimental.multihost_utils.process_allgather(again.model.lm_head[...], tiled=True)
    out["restored_equal"] = bool(np.array_equal(np.asarray(restored), lm_head))
  with open(spec["result"], "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  import jax.experimental.multihost_utils  # noqa: F401
  faulthandler.dump_traceback_later(200)  # a stalled process shows every thread's stack before the test's kill
  main(json.loads(sys.argv[1]))
