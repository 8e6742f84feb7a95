"""Sources given as URLs (``gs://...``): every importer reads configs and weights through etils.epath
(``storage.path``), never through a local ``open``. Bucket reads against a GCS emulator are in the
storage tests; here a ``gs://bucket/...`` path is served from a local folder by a stand-in for
``storage.path`` whose paths have a ``gs://`` fspath, so that any local ``open`` / ``os.path`` of it
fails."""
import os

import jax
import numpy as np
import pytest
import transformers
from etils import epath

from medfm_jax import interop, storage
from medfm_jax.interop import hf_dinov2, openclip, torch_io
from medfm_jax.train import restore

_TOWER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


class _BucketPath(os.PathLike):
  """``gs://bucket/<rel>`` backed by ``root/<rel>``: the epath.Path methods the importers use."""

  def __init__(self, root: epath.Path, rel: str = ""):
    self._root, self._rel = root, rel.strip("/")

  def _local(self) -> epath.Path:
    return self._root / self._rel if self._rel else self._root

  def __fspath__(self):
    return f"gs://bucket/{self._rel}"

  def __truediv__(self, name):
    return _BucketPath(self._root, f"{self._rel}/{name}")

  @property
  def parent(self):
    return _BucketPath(self._root, self._rel.rsplit("/", 1)[0] if "/" in self._rel else "")

  @property
  def name(self):
    return self._rel.rsplit("/", 1)[-1]

  def __getattr__(self, method):   # is_dir, is_file, read_bytes, read_text, mkdir, write_*
    return getattr(self._local(), method)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """``gs://bucket/...`` -> ``tmp_path/...`` for storage.path (local paths unchanged)."""
  real = storage.path

  def path(p):
    s = os.fspath(p)
    return _BucketPath(epath.Path(tmp_path), s[len("gs://bucket/"):]) if s.startswith("gs://bucket/") else real(p)
  monkeypatch.setattr(storage, "path", path)
  return tmp_path


def _dinov2(folder, safe):
  model = transformers.Dinov2Model(transformers.Dinov2Config(**_TOWER, image_size=16, patch_size=4)).eval()
  model.save_pretrained(folder, safe_serialization=safe)
  return model


@pytest.mark.parametrize("safe", [True, False])
def test_hf_model_from_a_url(bucket, safe):
  """An HF directory at gs://bucket/dinov2 (safetensors or a torch .bin): family detection, load
  and ``init_from``-style reading equal the local load; an epath.Path of the local folder loads too."""
  _dinov2(bucket / "dinov2", safe)
  url = "gs://bucket/dinov2"
  assert interop.hf_family(url) == "dinov2" and restore.hf_family(url) == "dinov2"
  _, params, overrides = hf_dinov2.load(url)
  _, ref, ref_overrides = hf_dinov2.load(str(bucket / "dinov2"))
  _, via_epath, _ = hf_dinov2.load(epath.Path(bucket / "dinov2"))
  assert overrides == ref_overrides
  for tree in (params, via_epath):
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r"^checkpoint 'gs://bucket/nothing' does not exist; expected [^\n]*$"):
    torch_io.load_torch_state_dict("gs://bucket/nothing")


def test_open_clip_export_and_load_through_a_url(bucket):
  """An open_clip export written to gs://bucket/oc (config, weights, the BERT / timm configs it
  names) loads back from the URL."""
  from tests.interop.test_openclip_parity import _biomedclip_source  # pylint: disable=import-outside-toplevel
  _, src = _biomedclip_source(bucket, "cls_last_hidden_state_pooler", "mlp", "linear")
  _, params, _ = openclip.load(src)
  openclip.export(params, src, "gs://bucket/oc")
  assert (bucket / "oc" / "hf_text" / "config.json").is_file() and (bucket / "oc" / "timm_trunk" / "config.json").is_file()
  assert interop.hf_family("gs://bucket/oc") == "openclip"
  _, back, _ = openclip.load("gs://bucket/oc")
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
