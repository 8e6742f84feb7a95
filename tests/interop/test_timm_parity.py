"""timm ``vit_*``: imported weights give timm's ``forward_features`` (float32, <= 1e-5), and an
export loads back with ``timm.create_model('local-dir:...')`` and computes our tokens."""
import jax
import numpy as np
import pytest
import timm
import torch

from medfm_jax.interop import timm_vit

ATOL = 1e-5


def _timm_model(**kw):
  torch.manual_seed(0)
  model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                            embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, **kw).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():   # non-trivial norms, biases, LayerScale, cls token
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  return model


def _apply(model, params, images):
  with jax.default_matmul_precision("highest"):
    return np.asarray(model.apply({"params": params}, images))


@pytest.mark.parametrize("kw, scan", [(dict(in_chans=3), False),
                                       (dict(in_chans=1, init_values=0.1, pre_norm=True), True)])
def test_import_export_round_trip(kw, scan, tmp_path):
  """Plain and CLIP-style (pre-norm, no patch bias, LayerScale) towers: import parity; export ->
  timm local-dir -> the same tokens; a classifier head is dropped on import."""
  ref_model = _timm_model(**kw)
  c = kw["in_chans"]
  images = np.random.default_rng(0).normal(size=(2, 16, 16, c)).astype(np.float32)
  with torch.no_grad():
    ref = ref_model.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  sd = dict(ref_model.state_dict(), **{"head.weight": torch.zeros(5, 32), "head.bias": torch.zeros(5)})
  model, params, overrides = timm_vit.load(sd, num_heads=4, scan=scan)
  assert overrides["model.ln_pre"] == bool(kw.get("pre_norm")) and overrides["data.channels"] == c
  assert np.abs(_apply(model, params, images) - ref).max() <= ATOL
  timm_vit.export(params, ref_model, tmp_path)
  back = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
  with torch.no_grad():
    again = back.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  assert np.abs(again - ref).max() <= ATOL
  assert timm_vit.load(tmp_path)[2] == overrides     # the head count comes from config.json


def test_errors_are_one_line():
  sd = _timm_model(in_chans=3).state_dict()
  with pytest.raises(ValueError, match=r"^timm ViT: the head count is not in the source; pass num_heads=$"):
    timm_vit.load(dict(sd))
  with pytest.raises(ValueError, match=r"^unsupported timm ViT: reg_token "):
    timm_vit.load(dict(sd, reg_token=torch.zeros(1, 4, 32)), num_heads=4)
  bad = {k: v for k, v in sd.items() if k != "blocks.1.ls1.gamma" and "norm2" not in k}
  with pytest.raises(ValueError, match=r"^convert \(timm ViT\): missing HF tensors: blocks.0.norm2.bias"):
    timm_vit.load(bad, num_heads=4)
