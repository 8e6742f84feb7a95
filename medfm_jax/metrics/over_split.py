"""One sharded pass of a jitted function over the first ``n`` records of a split (eval batches)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from medfm_jax.data import phantoms, pipeline
from medfm_jax.parallel import mesh as mesh_lib

LABELS = ("finding", "modality")   # every source; the phantoms add phantoms.LESION_LABELS


def map_over_split(data, mesh, run: Callable[[dict], Any], split: str, num_examples: int,
                   batch_size: int, keys: Sequence[str] = ("image",),
                   source=None) -> tuple[Any, dict[str, np.ndarray]]:
  """-> (``run(batch)`` outputs concatenated over rows as float32 numpy, {label: int ``[n]``}, the
  labels of :data:`LABELS` and the phantoms' lesion labels when the batches carry them).

  ``data``: the resolved ``data.spec.DataSpec`` (or ``config.data``, resolved at the entry).

  Global batches of ``batch_size`` (the fields ``keys``) are split over data x fsdp; ``run`` must
  return replicated arrays (``jax.jit(..., out_shardings=PartitionSpec())``), one or a pytree.
  Padding rows are dropped; the results are identical on every process. ``source``: the split's
  records when the caller has built them already (``pipeline.make_source``), not built again.
  """
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
  outs, labels = [], {k: [] for k in LABELS}
  with mesh_lib.use_mesh(mesh):
    for local in pipeline.make_eval_batches(data, split, batch_size, num_examples,
                                            jax.process_index(), jax.process_count(),
                                            source=source):
      batch = mesh_lib.to_global_batch({k: local[k] for k in keys}, mesh)
      keep = gather(local["mask"])
      outs.append(jax.tree.map(lambda x, keep=keep: np.asarray(x, np.float32)[keep], run(batch)))
      for k in (*LABELS, *phantoms.LESION_LABELS):
        if k in local:
          labels.setdefault(k, []).append(gather(local[k])[keep])
  return (jax.tree.map(lambda *xs: np.concatenate(xs), *outs),
          {k: np.concatenate(v) for k, v in labels.items()})
