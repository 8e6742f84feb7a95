"""Tests for the grain train/eval pipeline."""
import json
import os
import sys

import numpy as np
import pytest
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import common  # noqa: E402
from medfm_jax.data import pipeline  # noqa: E402
from medfm_jax.data import spec as data_spec  # noqa: E402
from medfm_jax.data.phantoms import LESION_LABELS, PhantomSource  # noqa: E402
from tests import helpers  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags


# ``data`` fields that objective configs add to the shared contract (CLIP/FLAVA text, MLM, mixing).
OBJECTIVE_DATA_FIELDS = ("tokenizer", "context_length", "mlm", "mix", "patch_masks", "label")


def _cfg(**kw):
  c = common.base_config().data
  c.image_size, c.channels, c.num_workers = 32, 1, 0
  return helpers.override(c, kw, allow_new=OBJECTIVE_DATA_FIELDS)


def _source(n=64):
  return PhantomSource("train", image_size=32, channels=1, num_examples=n)


_take = helpers.take
_assert_batches_equal = helpers.assert_batches_equal


@pytest.mark.parametrize("channels,size", [(1, 32), (3, 24)])
def test_train_batch_shapes_dtypes_and_range(channels, size):
  cfg = _cfg(channels=channels, image_size=size, mean=(0.5,) * channels, std=(0.25,) * channels)
  source = PhantomSource("train", image_size=32, channels=channels, num_examples=64)
  it = pipeline.make_train_iterator(cfg, 8, seed=0, source=source)
  b = next(it)
  assert set(b) == {"image", "modality", "finding", *LESION_LABELS}
  assert set(b) == set(data_spec.resolve(cfg).abstract_batch(8))
  assert b["image"].shape == (8, size, size, channels) and b["image"].dtype == np.float32
  assert b["modality"].shape == (8,) and b["modality"].dtype == np.int32
  assert b["finding"].dtype == np.int32 and 0 <= b["finding"].min() and b["finding"].max() < 6
  lo, hi = (0 - cfg.mean[0]) / cfg.std[0], (1 - cfg.mean[0]) / cfg.std[0]
  assert lo - 1e-5 <= b["image"].min() and b["image"].max() <= hi + 1e-5
  assert b["image"].std() > 0.1


def test_train_deterministic_per_seed():
  a = _take(pipeline.make_train_iterator(_cfg(), 8, seed=3, source=_source()), 2)
  b = _take(pipeline.make_train_iterator(_cfg(), 8, seed=3, source=_source()), 2)
  c = _take(pipeline.make_train_iterator(_cfg(), 8, seed=4, source=_source()), 2)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_restore_state_reproduces_next_batches():
  helpers.assert_restore_reproduces(  # skipping 4 batches crosses an epoch boundary (20 examples)
      lambda: pipeline.make_train_iterator(_cfg(), 8, seed=0, source=_source(20)), skip=4, check=3)


@pytest.mark.slow
def test_workers_restore_and_match_in_process_batches():
  cfg = _cfg(num_workers=2, prefetch=2)
  it = pipeline.make_train_iterator(cfg, 8, seed=0, source=_source())
  try:
    first = _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 3)
  finally:
    it.close()
  fresh = pipeline.make_train_iterator(cfg, 8, seed=0, source=_source())
  try:
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected)
  finally:
    fresh.close()
  # Batches do not depend on the number of worker processes.
  in_process = _take(pipeline.make_train_iterator(_cfg(), 8, seed=0, source=_source()), 6)
  _assert_batches_equal(in_process, first + expected)


def test_shard_stream_disjoint_covering_and_reshuffled():
  n, procs = 12, 3
  per_proc = [[pipeline.shard_stream(n, seed=5, process_index=p, process_count=procs)[i]
               for i in range(2 * n // procs)] for p in range(procs)]
  epoch1 = [{idx for _, idx in s[:n // procs]} for s in per_proc]
  assert sum(len(e) for e in epoch1) == n and set().union(*epoch1) == set(range(n))
  for p, s in enumerate(per_proc):
    assert [pos for pos, _ in s] == list(range(p, 2 * n, procs))
  order1 = [idx for i in range(n) for idx in [per_proc[i % procs][i // procs][1]]]
  order2 = [per_proc[i % procs][(n + i) // procs][1] for i in range(n)]
  assert sorted(order2) == list(range(n)) and order1 != order2


def test_shard_stream_blocks():
  blocks = [[pipeline.shard_stream(12, seed=5, process_index=p, process_count=2, block=3)[i][0]
             for i in range(6)] for p in range(2)]
  assert blocks == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]]


def test_process_batches_are_rows_of_the_global_batch():
  helpers.assert_process_rows(lambda p, n: pipeline.make_train_iterator(
      _cfg(), 8, seed=1, process_index=p, process_count=n, source=_source()), global_batch=8)
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.make_train_iterator(_cfg(), 9, seed=0, process_count=2, source=_source())


def test_eval_batches_pad_and_mask():
  cfg, src = _cfg(), _source(30)
  batches = pipeline.make_eval_batches(cfg, "train", 4, 10, source=src)
  out = list(batches)
  assert len(batches) == len(out) == 3
  _assert_batches_equal(out, list(batches))  # re-iterable, deterministic
  for b in out:
    assert set(b) == {"image", "modality", "finding", "mask", *LESION_LABELS}
    assert b["image"].shape == (4, 32, 32, 1) and b["mask"].dtype == np.bool_
  np.testing.assert_array_equal(out[-1]["mask"], [True, True, False, False])
  np.testing.assert_array_equal(out[-1]["lesion_location"][2:], [-1, -1])   # padding: unlabelled
  np.testing.assert_array_equal(np.concatenate([b["lesion_size"] for b in out])[:10],
                                [src[i]["lesion_size"] for i in range(10)])
  assert not out[-1]["image"][2:].any()
  np.testing.assert_array_equal(np.concatenate([b["modality"] for b in out])[:10],
                                [src[i]["modality"] for i in range(10)])
  # Two processes: same number of batches, rows [2p, 2p+2) of the global batches.
  for p in range(2):
    local = list(pipeline.make_eval_batches(cfg, "train", 4, 10, p, 2, source=src))
    assert len(local) == 3
    for g, l in zip(out, local, strict=True):
      for k in g:
        np.testing.assert_array_equal(l[k], g[k][p * 2:(p + 1) * 2])


def test_make_source_and_errors():
  cfg = _cfg()
  src = pipeline.make_source(cfg, "val")
  assert len(src) == 2000 and src[0]["image"].shape == (32, 32, 1)
  cfg.source = "imagenet"
  with pytest.raises(ValueError, match="data.source"):
    pipeline.make_source(cfg, "train")
  with pytest.raises(ValueError, match="data.eval_examples"):
    pipeline.make_eval_batches(_cfg(), "train", 4, 100, source=_source(30))
