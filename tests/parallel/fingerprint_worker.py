"""One of 2 processes (jax.distributed over localhost, gloo, 4 CPU devices each) that fingerprint
the same global state, kernels split over all 8 devices, on the accelerators' path and on the
host path; prints ``{"device": ..., "host": ...}`` as one JSON line.

  python -m tests.parallel.fingerprint_worker PORT PROCESS_ID
"""
import json
import sys

import jax
import numpy as np

from medfm_jax.parallel import distributed
from medfm_jax.train import checkpoint


def global_values() -> dict[str, np.ndarray]:
  """The state's values (the same on every process and in the test)."""
  rng = np.random.default_rng(3)
  return {"kernel": rng.normal(size=(16, 24)).astype(np.float32),
          "out_kernel": rng.integers(-2**31, 2**31, size=(8, 16), dtype=np.int32),
          "bias": rng.normal(size=(24,)).astype(np.float32)}


def main(port: str, process_id: str) -> None:
  distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id))
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  specs = {"kernel": ("fsdp", "data"), "out_kernel": ("data", "fsdp"), "bias": ()}
  state = {}
  for name, value in global_values().items():
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*specs[name]))
    state[name] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
  print(json.dumps({"device": checkpoint.fingerprint(state, on_device=True),
                    "host": checkpoint.fingerprint(state, on_device=False)}), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
