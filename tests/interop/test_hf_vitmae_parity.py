"""Numerical parity of our MaskedAutoencoder with Hugging Face ``ViTMAEForPreTraining`` (torch, CPU)."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
import torch
import transformers

from medfm_jax.interop import hf_vitmae
from medfm_jax.models import layers, mae

ATOL = 1e-5
# Encoders match VARIANTS["Mu"] = (96, 4, 3, 384); decoders are free.
MU = dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384)
CASES = {
    # 16 patches, 1 channel, HF's default LayerNorm eps 1e-12.
    "img32_p8_c1": dict(MU, image_size=32, patch_size=8, num_channels=1, decoder_hidden_size=64,
                        decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
                        decoder_intermediate_size=256, layer_norm_eps=1e-12),
    # 49 patches -> int(49 * 0.25) = 12 kept; 3 channels; head_dim 12 in the decoder.
    "img28_p4_c3": dict(MU, image_size=28, patch_size=4, num_channels=3, decoder_hidden_size=48,
                        decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
                        decoder_intermediate_size=192, layer_norm_eps=1e-6),
}


def _hf_model(name, seed=0):
  """Random HF model with HF's own sin-cos position embeddings and every other tensor randomised."""
  torch.manual_seed(seed)
  config = transformers.ViTMAEConfig(**CASES[name], mask_ratio=0.75, norm_pix_loss=True)
  model = transformers.ViTMAEForPreTraining(config).float().eval()
  # transformers 5.x random init leaves the sin-cos buffers, cls and mask tokens at zero (the
  # `_is_hf_initialized` flags skip ViTMAEEmbeddings.initialize_weights); rerun HF's own init.
  for module in model.modules():
    for t in (module, *module.parameters(recurse=False), *module.buffers(recurse=False)):
      if hasattr(t, "_is_hf_initialized"):
        delattr(t, "_is_hf_initialized")
  model.vit.embeddings.initialize_weights()
  model.decoder.initialize_weights(model.vit.embeddings.patch_embeddings.num_patches)
  with torch.no_grad():  # nonzero biases / non-unit norms so that every mapping is exercised
    for n, p in model.named_parameters():
      if n in (hf_vitmae.ENCODER_POS_EMBED, hf_vitmae.DECODER_POS_EMBED):
        continue
      is_norm_scale = n.endswith(".weight") and p.ndim == 1
      p.copy_(float(is_norm_scale) + 0.05 * torch.randn_like(p))
  return model, config


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  model, config = _hf_model(request.param)
  path = tmp_path_factory.mktemp(request.param) / "model.safetensors"
  safetensors_numpy.save_file({k: v.numpy() for k, v in model.state_dict().items()}, str(path))
  s, c, p = config.image_size, config.num_channels, config.patch_size
  gen = torch.Generator().manual_seed(1)
  pixels = torch.randn(3, c, s, s, generator=gen)
  noise = torch.rand(3, (s // p) ** 2, generator=gen)
  with torch.no_grad():
    out = model(pixels, noise=noise)
    latent = model.vit(pixels, noise=noise).last_hidden_state
  return dict(name=request.param, model=model, config=config, path=path, pixels=pixels, noise=noise,
              logits=out.logits.numpy(), loss=out.loss.item(), mask=out.mask.numpy(), latent=latent.numpy())


@functools.partial(jax.jit, static_argnums=(0, 4))
def _forward(model, params, images, noise, patch_size):
  """Our forward and norm-pix loss as one program (eager, each op of the model compiles on its own)."""
  out = model.apply({"params": params}, images, noise, 0.75)
  return out, mae.mae_loss(images, out["pred"], out["mask"], patch_size, norm_pix_loss=True)


def _run(model, params, case):
  """``(outputs, loss)`` of our model on the case's pixels (NCHW torch -> NHWC) and noise."""
  images = jnp.asarray(case["pixels"].numpy().transpose(0, 2, 3, 1))
  out, loss = _forward(model, params, images, jnp.asarray(case["noise"].numpy()), case["config"].patch_size)
  return out, float(loss)


def _ours(case, scan):
  params = hf_vitmae.convert_vitmae(hf_vitmae.load_torch_state_dict(case["path"]), case["config"], scan=scan)
  out, loss = _run(hf_vitmae.build_mae(case["config"], scan=scan), params, case)
  return params, out, loss


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.slow
def test_forward_parity(case, scan):
  _, out, loss = _ours(case, scan)
  np.testing.assert_array_equal(np.asarray(out["mask"]), case["mask"])
  assert out["pred"].shape == case["logits"].shape
  assert _max_diff(out["pred"], case["logits"]) <= ATOL
  assert _max_diff(out["latent"], case["latent"]) <= ATOL
  assert abs(loss - case["loss"]) <= ATOL


def test_hf_pos_embed_is_our_sincos(case):
  sd = case["model"].state_dict()
  grid = case["config"].image_size // case["config"].patch_size
  for name, width in ((hf_vitmae.ENCODER_POS_EMBED, case["config"].hidden_size),
                      (hf_vitmae.DECODER_POS_EMBED, case["config"].decoder_hidden_size)):
    ours = layers.sincos_2d(width, grid, grid, cls_token=True)
    np.testing.assert_allclose(sd[name][0].numpy(), ours, rtol=0, atol=1e-6)


def test_export_round_trip(case):
  sd = hf_vitmae.load_torch_state_dict(case["path"])
  for scan in (False, True):
    exported = hf_vitmae.export_vitmae(hf_vitmae.convert_vitmae(sd, case["config"], scan=scan), case["config"])
    assert set(exported) == set(sd)
    for k, v in sd.items():
      np.testing.assert_allclose(exported[k], v, rtol=0, atol=1e-6, err_msg=k)
  fresh = transformers.ViTMAEForPreTraining(case["config"])
  fresh.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)


def test_scan_layout_matches_init(case):
  params = hf_vitmae.convert_vitmae(hf_vitmae.load_torch_state_dict(case["path"]), case["config"], scan=True)
  cfg = hf_vitmae.config_from_hf(case["config"])
  block = params["decoder"]["encoder"]["layers"]["block"]
  assert block["attn"]["query"]["kernel"].shape == (cfg["decoder_depth"], cfg["decoder_width"],
                                                    cfg["decoder_heads"], cfg["decoder_width"] // cfg["decoder_heads"])
  assert params["encoder"]["encoder"]["layers"]["block"]["mlp"]["fc1"]["kernel"].shape == (4, 96, 384)


def _legacy(name):
  """Current HF tensor name -> the transformers 4.x name (as in Hub checkpoints)."""
  for new, old in (("vit.layers.", "vit.encoder.layer."), (".attention.q_proj.", ".attention.attention.query."),
                   (".attention.k_proj.", ".attention.attention.key."),
                   (".attention.v_proj.", ".attention.attention.value."),
                   (".attention.o_proj.", ".attention.output.dense."), (".mlp.fc1.", ".intermediate.dense."),
                   (".mlp.fc2.", ".output.dense.")):
    name = name.replace(new, old)
  return name


def test_legacy_names(case, tmp_path):
  sd = hf_vitmae.load_torch_state_dict(case["path"])
  legacy = {_legacy(k): v for k, v in sd.items()}
  assert "vit.encoder.layer.0.attention.attention.query.weight" in legacy
  # transformers itself loads these names into the same tensors ...
  safetensors_numpy.save_file(legacy, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(case["config"].to_dict()))
  loaded = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path)).state_dict()
  for k, v in sd.items():
    np.testing.assert_array_equal(loaded[k].numpy(), v, err_msg=k)
  # ... and so do we (config read from the directory's config.json).
  a = hf_vitmae.convert_vitmae(sd, case["config"])
  b = hf_vitmae.convert_vitmae(hf_vitmae.load_torch_state_dict(tmp_path), str(tmp_path))
  fa, fb = flatten(a), flatten(b)
  assert fa and sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out


def test_convert_errors(case):
  sd = hf_vitmae.load_torch_state_dict(case["path"])
  cfg = case["config"]
  with pytest.raises(ValueError, match="unused HF tensors: vit.extra"):
    hf_vitmae.convert_vitmae({**sd, "vit.extra": np.zeros(3, np.float32)}, cfg)
  dropped = {k: v for k, v in sd.items() if k != "vit.layers.1.mlp.fc1.bias"}
  with pytest.raises(ValueError, match=r"missing HF tensors: vit.layers.1.mlp.fc1.bias.*"
                                       r"unfilled params: encoder/encoder/layer_1/mlp/fc1/bias"):
    hf_vitmae.convert_vitmae(dropped, cfg)
  with pytest.raises(ValueError, match="decoder/pred/kernel"):
    hf_vitmae.convert_vitmae({**sd, "decoder.decoder_pred.weight": sd["decoder.decoder_pred.weight"][:-1]}, cfg)
  with pytest.raises(ValueError, match="differs from our fixed 2-D sin-cos"):
    hf_vitmae.convert_vitmae({**sd, hf_vitmae.DECODER_POS_EMBED: 0 * sd[hf_vitmae.DECODER_POS_EMBED]}, cfg)
  # A config that disagrees with the weights is caught as shape mismatches.
  with pytest.raises(ValueError, match="mismatches: decoder/encoder/layer_0/mlp/fc1"):
    hf_vitmae.convert_vitmae(sd, {**cfg.to_dict(), "decoder_intermediate_size": 100})
  # Encoder sizes outside the variant table are expressed as explicit overrides.
  model = hf_vitmae.build_mae({**cfg.to_dict(), "num_hidden_layers": 5, "decoder_intermediate_size": 100})
  assert model.encoder.size.depth == 5 and model.decoder_mlp_dim == 100


def test_load_torch_state_dict_formats(case, tmp_path):
  sd = hf_vitmae.load_torch_state_dict(case["path"])
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "pytorch_model.bin")
  for src in (tmp_path / "pytorch_model.bin", tmp_path, case["path"].parent):
    got = hf_vitmae.load_torch_state_dict(src)
    assert set(got) == set(sd)
    np.testing.assert_array_equal(got["vit.layernorm.weight"], sd["vit.layernorm.weight"])
  # bfloat16 (numpy has no such dtype) is upcast to float32.
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  w = torch.randn(5, 3)
  safetensors.torch.save_file({"w": w.bfloat16(), "i": torch.arange(4)}, str(tmp_path / "bf16.safetensors"))
  got = hf_vitmae.load_torch_state_dict(tmp_path / "bf16.safetensors")
  np.testing.assert_array_equal(got["w"], w.bfloat16().float().numpy())
  assert got["w"].dtype == np.float32 and got["i"].dtype == np.int64
  with pytest.raises(ValueError, match="does not exist"):
    hf_vitmae.load_torch_state_dict(tmp_path / "nope.safetensors")
  (tmp_path / "weights.npz").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown file type"):
    hf_vitmae.load_torch_state_dict(tmp_path / "weights.npz")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds none of"):
    hf_vitmae.load_torch_state_dict(tmp_path / "empty")


def test_bench_torch_smoke():
  from medfm_jax import bench_torch  # pylint: disable=import-outside-toplevel
  r = bench_torch.torch_mae_train_step_time("Mu/8", image_size=32, channels=1, batch_size=2, decoder_width=32,
                                            decoder_depth=1, decoder_heads=2, steps=2, warmup=1, threads=1)
  assert set(r) == {"step_time_median_s", "images_per_s", "first_step_s"}
  assert r["step_time_median_s"] > 0 and r["images_per_s"] > 0


@pytest.mark.slow
def test_load_export_from_pretrained_round_trip(case, tmp_path):
  """load(HF directory, scanned) -> export -> ViTMAEForPreTraining.from_pretrained: no key missing
  or unexpected, and the reloaded torch model gives our predictions and loss (<= 1e-5) on the same
  noise; config_overrides name the sizes."""
  case["model"].save_pretrained(tmp_path / "src")
  model, params, overrides = hf_vitmae.load(tmp_path / "src", scan=True)
  assert overrides["model.decoder_width"] == case["config"].decoder_hidden_size
  assert overrides["data.channels"] == case["config"].num_channels
  hf_vitmae.export(params, tmp_path / "src", tmp_path / "out")
  back, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "out", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert back.config.norm_pix_loss and back.config.layer_norm_eps == case["config"].layer_norm_eps
  with torch.no_grad():
    ref = back.eval()(case["pixels"], noise=case["noise"])
  out, loss = _run(model, params, case)
  assert _max_diff(out["pred"], ref.logits.numpy()) <= ATOL
  assert abs(loss - ref.loss.item()) <= ATOL
