"""DataSpec: the data config resolved once; its abstract train batch equals a real first batch."""
import dataclasses

import jax
import numpy as np
import pytest

from configs import common
from medfm_jax.data import image_files, pipeline
from medfm_jax.data import spec as data_spec
from medfm_jax.parallel import mesh as mesh_lib
from tests import helpers

TRAIN_CONFIGS = {
    "mae": helpers.tiny_mae_config,
    "dino": lambda: helpers.tiny_dino_config("tiny"),
    "dinov2": lambda: helpers.tiny_dino_config("tiny_v2"),
    "clip": helpers.tiny_clip_config,
    "flava": helpers.tiny_flava_config,
    "finetune": lambda: helpers.tiny_eval_config("finetune"),
}


def _shapes(batch) -> dict:
  """{key: (shape, dtype)} of a train batch or an abstract batch (flat: the pipeline's keys)."""
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch.items()}


def _assert_matches(abstract, batch):
  """``abstract`` describes ``batch`` (numeric leaves) key by key: same keys, shapes, dtypes."""
  batch = mesh_lib.drop_non_numeric(batch)
  assert all(isinstance(v, jax.ShapeDtypeStruct) for v in abstract.values())
  assert all(v.sharding is None for v in abstract.values())
  assert set(abstract) == set(batch), f"keys: abstract {sorted(abstract)} != real {sorted(batch)}"
  got, want = _shapes(abstract), _shapes(batch)
  for k in want:
    assert got[k] == want[k], f"{k}: abstract {got[k]} != real {want[k]}"


def _first_batch(spec, batch_size, seed=0, **kw):
  it = pipeline.make_train_iterator(spec, batch_size, seed, **kw)
  try:
    return next(it)
  finally:
    if hasattr(it, "close"):
      it.close()


@pytest.fixture(scope="module", params=sorted(TRAIN_CONFIGS))
def resolved(request):
  """(name, config, spec, its first train batch) of each test train config."""
  c = TRAIN_CONFIGS[request.param]()
  spec = data_spec.resolve(c.data)
  return request.param, c, spec, _first_batch(spec, c.batch_size, c.seed)


def test_abstract_batch_equals_the_first_train_batch(resolved):
  _, c, spec, batch = resolved
  _assert_matches(spec.abstract_batch(c.batch_size), batch)


# Negative controls: a spec that differs in one field describes another batch.
MUTATIONS = {
    "mae": lambda s: dataclasses.replace(s, image_size=s.image_size * 2),
    "finetune": lambda s: dataclasses.replace(s, channels=4 - s.channels),
    "dino": lambda s: dataclasses.replace(s, multicrop=dataclasses.replace(s.multicrop, num_local=3)),
    "dinov2": lambda s: dataclasses.replace(s, patch_masks=None),
    "clip": lambda s: dataclasses.replace(s, tokenizer=dataclasses.replace(s.tokenizer, context_length=7)),
    "flava": lambda s: dataclasses.replace(s, mix=None),
}


def test_abstract_batch_of_another_spec_fails_the_comparison(resolved):
  name, c, spec, batch = resolved
  with pytest.raises(AssertionError):
    _assert_matches(MUTATIONS[name](spec).abstract_batch(c.batch_size), batch)
  with pytest.raises(AssertionError):   # and another batch size
    _assert_matches(spec.abstract_batch(c.batch_size * 2), batch)


def test_abstract_batch_counts_skips_of_file_sources(tmp_path):
  """``data.on_error='skip'`` file sources add ``data_skipped`` (phantoms never do)."""
  for i in range(4):
    image_files.write_image(str(tmp_path / f"{i}.png"), np.full((20, 20), 40 * i, np.uint8))
  (tmp_path / "bad.png").write_bytes(b"not a png")
  manifest = tmp_path / "m.csv"
  manifest.write_text("path,label\n" + "".join(f"{tmp_path / n},x\n" for n in
                                               ("0.png", "bad.png", "1.png", "2.png", "3.png")))
  c = common.base_config().data
  c.update(source="manifest", path=str(manifest), splits="train:1", image_size=16, channels=1,
           on_error="skip")
  spec = data_spec.resolve(c)
  assert pipeline.SKIPPED_KEY in spec.abstract_batch(4)
  _assert_matches(spec.abstract_batch(4), _first_batch(spec, 4))
  phantoms = data_spec.resolve(helpers.override(helpers.tiny_mae_config(), {"data.on_error": "skip"}).data)
  assert pipeline.SKIPPED_KEY not in phantoms.abstract_batch(4)


def test_resolve_once_per_content():
  """Equal configs share one spec; a changed field resolves anew; a spec passes through."""
  a, b = helpers.tiny_flava_config(), helpers.tiny_flava_config()
  spec = data_spec.resolve(a.data)
  assert data_spec.resolve(b.data) is spec and data_spec.resolve(spec) is spec
  assert pipeline.masked_inputs(spec, 16).mlm is spec.mlm
  b.data.mlm.probability = 0.3
  assert data_spec.resolve(b.data).mlm.probability == 0.3 and spec.mlm.probability == 0.15


def test_config_and_spec_give_the_same_batches():
  """The entry points take ``config.data`` or its spec: the same pipeline either way."""
  c = helpers.tiny_flava_config()
  spec = data_spec.resolve(c.data)
  helpers.assert_batches_equal(helpers.take(pipeline.make_train_iterator(c.data, 16, 0), 2),
                               helpers.take(pipeline.make_train_iterator(spec, 16, 0), 2))
  helpers.assert_batches_equal(list(pipeline.make_eval_batches(c.data, "val", 16, 20)),
                               list(pipeline.make_eval_batches(spec, "val", 16, 20)))


@pytest.mark.parametrize("overrides,match", [
    ({"data.multicrop": 3}, "data.multicrop=3 must be a dict"),
    ({"data.mix": {"paired": 0.5, "all": 0.5}}, "data.mix has unknown kinds"),
    ({"data.mlm": {"probability": 2.0}}, "data.mlm.probability=2.0"),
    ({"data.tokenizer": "bpe"}, "data.tokenizer='bpe'"),
    ({"data.patch_masks.patch_size": 5}, "data.patch_masks.patch_size=5 must divide"),
])
def test_bad_values_fail_in_resolve_with_one_line(overrides, match):
  c = helpers.tiny_flava_config(allow_new=("data.multicrop",), **overrides)
  with pytest.raises(ValueError, match=match) as e:
    data_spec.resolve(c.data)
  assert "\n" not in str(e.value)
