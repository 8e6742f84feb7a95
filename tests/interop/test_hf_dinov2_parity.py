"""Numerical parity of our VisionTransformer with HF ``Dinov2Model`` / ``Dinov2WithRegistersModel``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
import torch
import transformers

from medfm_jax.interop import hf_dinov2
from medfm_jax.models import layers

ATOL = 1e-5
CASES = {
    # Dinov2Model: SwiGLU (hidden ((int(48*4*2/3)+7)//8)*8 = 128), 1 channel, no q/k/v bias, eps 1e-5,
    # 16 patches of 7; other resolution upsamples the 4x4 position grid to 6x6. Scanned encoder.
    "plain_swiglu": dict(registers=False, scan=True, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                         image_size=28, patch_size=7, num_channels=1, use_swiglu_ffn=True, qkv_bias=False,
                         layer_norm_eps=1e-5, other_size=42),
    # Dinov2WithRegistersModel: 4 registers, GELU MLP, 3 channels, 49 patches of 4; other resolution
    # downsamples the 7x7 grid to 5x5. Unrolled encoder.
    "registers_gelu": dict(registers=True, scan=False, num_register_tokens=4, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=4, num_channels=3, other_size=20),
}


def _hf_model(name, seed=0):
  """Random HF model: every tensor randomised, LayerScale around 0.5 (non-trivial), norms near 1."""
  kw = dict(CASES[name])
  registers = kw.pop("registers")
  del kw["other_size"], kw["scan"]
  config_cls, model_cls = ((transformers.Dinov2WithRegistersConfig, transformers.Dinov2WithRegistersModel)
                           if registers else (transformers.Dinov2Config, transformers.Dinov2Model))
  torch.manual_seed(seed)
  model = model_cls(config_cls(**kw)).float().eval()
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "lambda1" in n:
        p.copy_(0.5 + 0.3 * torch.randn_like(p))
      elif n.endswith(".weight") and p.ndim == 1:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif n.startswith("embeddings.") and not n.startswith("embeddings.patch"):
        p.copy_(torch.randn_like(p))       # cls, mask, register tokens, position embeddings
      else:
        p.copy_(0.1 * torch.randn_like(p))
  return model


def _nhwc(x):
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
  model = _hf_model(request.param)
  c = model.config
  gen = torch.Generator().manual_seed(1)
  other = CASES[request.param]["other_size"]
  pixels = torch.randn(2, c.num_channels, c.image_size, c.image_size, generator=gen)
  pixels_other = torch.randn(2, c.num_channels, other, other, generator=gen)
  n = (c.image_size // c.patch_size) ** 2
  masked = torch.rand(2, n, generator=gen) < 0.4
  with torch.no_grad():
    out = model(pixels)
    out_masked = model(pixels, bool_masked_pos=masked)
    out_other = model(pixels_other)
  return dict(name=request.param, model=model, pixels=pixels, pixels_other=pixels_other, masked=masked,
              hidden=out.last_hidden_state.numpy(), pooler=out.pooler_output.numpy(),
              hidden_masked=out_masked.last_hidden_state.numpy(), hidden_other=out_other.last_hidden_state.numpy())


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _apply(model, params, images, patch_mask=None):
  with jax.default_matmul_precision("highest"):
    return jax.jit(model.apply)({"params": params}, images, patch_mask=patch_mask)


def test_forward_parity(case):
  """last_hidden_state and pooler_output (each case with its own encoder layout, unrolled or scanned)."""
  scan = CASES[case["name"]]["scan"]
  model, params, _ = hf_dinov2.load(case["model"], scan=scan)
  assert "layers" in params["encoder"] if scan else "layer_1" in params["encoder"]
  assert model.num_registers == CASES[case["name"]].get("num_register_tokens", 0)
  # One forward: the images unmasked, then with HF's bool_masked_pos as our patch_mask (both put the
  # mask token in place of patch embeddings before position embeddings).
  images, masked = _nhwc(case["pixels"]), jnp.asarray(case["masked"].numpy())
  tokens = _apply(model, params, jnp.concatenate([images, images]),
                  jnp.concatenate([jnp.zeros_like(masked), masked]))
  plain, with_mask = np.split(np.asarray(tokens), 2)
  assert plain.shape == case["hidden"].shape
  assert _max_diff(plain, case["hidden"]) <= ATOL
  assert _max_diff(plain[:, 0], case["pooler"]) <= ATOL      # HF pooler = layernormed cls
  assert _max_diff(with_mask, case["hidden_masked"]) <= ATOL
  assert _max_diff(with_mask, plain) > 0.1


def test_other_resolution(case):
  """Position grid resampled at import with HF's rule: parity with HF run at ``other_size``."""
  s = CASES[case["name"]]["other_size"]
  model, params, _ = hf_dinov2.load(case["model"], image_size=s)
  assert model.image_size == s
  assert _max_diff(_apply(model, params, _nhwc(case["pixels_other"])), case["hidden_other"]) <= ATOL


@pytest.mark.parametrize("n_in,n_out", [(4, 6), (6, 4), (3, 8), (8, 3), (5, 5)])
@pytest.mark.parametrize("antialias", [False, True])
def test_resize_matches_torch(n_in, n_out, antialias):
  grid = np.random.default_rng(0).normal(size=(n_in, n_in + 1, 3)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(n_out, n_out + 2),
                                        mode="bicubic", align_corners=False, antialias=antialias)
  got = hf_dinov2.hf_resize_pos_grid(grid, (n_out, n_out + 2), antialias)
  np.testing.assert_allclose(got, ref[0].permute(1, 2, 0).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_in,n_out", [(4, 6), (16, 37), (7, 5)])
def test_runtime_resize_vs_hf(n_in, n_out):
  """Our run-time resampling (``layers.interpolate_pos_embed``: jax bicubic a=-0.5, antialiased)
  is Dinov2WithRegisters' rule, not Dinov2Model's (torch bicubic a=-0.75, no antialias): for the
  latter, convert with ``image_size=`` to match HF at another resolution."""
  grid = np.random.default_rng(0).normal(size=(n_in, n_in, 8)).astype(np.float32)
  ours = np.asarray(layers.interpolate_pos_embed(jnp.asarray(grid.reshape(1, -1, 8)), (n_in, n_in),
                                                 (n_out, n_out), num_prefix=0)).reshape(n_out, n_out, 8)
  assert _max_diff(ours, hf_dinov2.hf_resize_pos_grid(grid, (n_out, n_out), antialias=True)) <= 1e-5
  assert _max_diff(ours, hf_dinov2.hf_resize_pos_grid(grid, (n_out, n_out), antialias=False)) > 1e-2


def test_export_round_trip(case):
  sd = {k: v.numpy() for k, v in case["model"].state_dict().items()}
  config = case["model"].config
  for scan in (False, True):
    params = hf_dinov2.convert_dinov2(case["model"], scan=scan)
    exported = hf_dinov2.export_dinov2(params, config)
    assert set(exported) == set(sd)
    for k, v in sd.items():
      if k == "embeddings.cls_token":  # cls position folded into the token, zero position exported
        np.testing.assert_allclose(exported[k], v + sd["embeddings.position_embeddings"][:, :1], atol=1e-6)
      elif k == "embeddings.position_embeddings":
        np.testing.assert_array_equal(exported[k][:, 0], 0)
        np.testing.assert_allclose(exported[k][:, 1:], v[:, 1:], rtol=0, atol=1e-6, err_msg=k)
      else:
        np.testing.assert_allclose(exported[k], v, rtol=0, atol=1e-6, err_msg=k)
    again = hf_dinov2.convert_dinov2(exported, config, scan=scan)
    jax.tree.map(np.testing.assert_array_equal, again, params)
  fresh = type(case["model"])(config).eval()
  fresh.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)
  with torch.no_grad():
    assert _max_diff(fresh(case["pixels"]).last_hidden_state, case["hidden"]) <= ATOL


def _legacy(sd):
  """Current names -> transformers 4.x / Hub names (packed SwiGLU weights_in), in a task model."""
  out = {}
  for k, v in sd.items():
    for new, old in ((".attention.q_proj.", ".attention.attention.query."),
                     (".attention.k_proj.", ".attention.attention.key."),
                     (".attention.v_proj.", ".attention.attention.value."),
                     (".attention.o_proj.", ".attention.output.dense."), (".mlp.down_proj.", ".mlp.weights_out.")):
      k = k.replace(new, old)
    if ".mlp.gate_proj." in k:
      v = np.concatenate([v, sd[k.replace("gate_proj", "up_proj")]])
      k = k.replace("gate_proj", "weights_in")
    elif ".mlp.up_proj." in k:
      continue
    out["dinov2." + k] = v
  return out


def test_hub_directory_and_legacy_names(tmp_path):
  """A saved HF directory loads offline; 4.x names (as in Hub checkpoints) give the same params and
  transformers itself reads them into the same tensors."""
  model = _hf_model("plain_swiglu")
  model.save_pretrained(tmp_path / "current")
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  legacy = _legacy(sd)
  assert "dinov2.encoder.layer.0.mlp.weights_in.weight" in legacy
  legacy_dir = tmp_path / "legacy"
  legacy_dir.mkdir()
  safetensors_numpy.save_file({k[len("dinov2."):]: v for k, v in legacy.items()},
                              str(legacy_dir / "model.safetensors"))
  (legacy_dir / "config.json").write_text(model.config.to_json_string())
  loaded = transformers.Dinov2Model.from_pretrained(str(legacy_dir)).state_dict()
  for k, v in sd.items():
    np.testing.assert_array_equal(loaded[k].numpy(), v, err_msg=k)
  ref = hf_dinov2.convert_dinov2(model)
  classifier = {"classifier.weight": np.zeros((3, 96), np.float32)}  # task head: dropped
  for params in (hf_dinov2.load(str(tmp_path / "current"))[1], hf_dinov2.convert_dinov2(legacy_dir),
                 hf_dinov2.convert_dinov2(legacy | classifier, model.config)):
    jax.tree.map(np.testing.assert_array_equal, params, ref)


def test_convert_errors():
  model = _hf_model("registers_gelu")
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  config = model.config
  with pytest.raises(ValueError, match="unused HF tensors: embeddings.extra"):
    hf_dinov2.convert_dinov2({**sd, "embeddings.extra": np.zeros(3, np.float32)}, config)
  dropped = {k: v for k, v in sd.items() if k != "encoder.layer.1.layer_scale2.lambda1"}
  with pytest.raises(ValueError, match=r"missing HF tensors: encoder.layer.1.layer_scale2.lambda1.*"
                                       r"unfilled params: encoder/layer_1/ls2/gamma"):
    hf_dinov2.convert_dinov2(dropped, config)
  with pytest.raises(ValueError, match="mismatches: registers"):
    hf_dinov2.convert_dinov2(sd, {**config.to_dict(), "num_register_tokens": 3})
  with pytest.raises(ValueError, match="pass hf_config"):
    hf_dinov2.convert_dinov2(sd)
  with pytest.raises(ValueError, match=r"hidden_act='swish'.*image_size=30 not divisible by patch_size=4"):
    hf_dinov2.config_from_hf({**config.to_dict(), "hidden_act": "swish"}, image_size=30)
  with pytest.raises(ValueError, match="config .* does not exist"):
    hf_dinov2.config_from_hf("/nonexistent/dinov2")


@pytest.mark.parametrize("width", [32, 48, 384, 1536])
def test_swiglu_hidden_matches_hf(width):
  config = transformers.Dinov2Config(hidden_size=width, num_attention_heads=1, use_swiglu_ffn=True)
  layer = transformers.models.dinov2.modeling_dinov2.Dinov2SwiGLUFFN(config)
  assert hf_dinov2.swiglu_hidden(width, config.mlp_ratio) == layer.gate_proj.out_features
  assert hf_dinov2.vit_kwargs(config)["mlp_dim"] == layer.gate_proj.out_features


def test_config_overrides_build_the_same_encoder():
  from configs import dino  # pylint: disable=import-outside-toplevel
  from medfm_jax.models import vit  # pylint: disable=import-outside-toplevel
  config = transformers.Dinov2WithRegistersConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                                  image_size=28, patch_size=7, num_register_tokens=2,
                                                  use_swiglu_ffn=True)
  c = dino.get_config("tiny")
  for key, value in hf_dinov2.config_overrides(config).items():
    section, field = key.split(".")
    if field in c[section]:
      c[section][field] = value
  ours = vit.vit_from_config(c)
  ref = hf_dinov2.build_vit(config, attention_impl=ours.attention_impl)
  for field in ("size", "image_size", "pos_embed", "layer_norm_eps", "layer_scale_init", "num_registers",
                "activation", "swiglu", "mask_token", "qkv_bias", "final_norm"):
    assert getattr(ours, field) == getattr(ref, field), field
  with pytest.raises(ValueError, match="qkv_bias=False"):
    hf_dinov2.config_overrides({**config.to_dict(), "qkv_bias": False})


def _from_pretrained(path):
  cls = transformers.AutoModel
  model, info = cls.from_pretrained(path, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return model.eval()


def test_load_export_from_pretrained_round_trip(case, tmp_path):
  """load(HF directory) -> export -> AutoModel.from_pretrained (Dinov2Model or
  Dinov2WithRegistersModel): the reloaded model gives our tokens with and without a patch mask."""
  case["model"].save_pretrained(tmp_path / "src")
  model, params, overrides = hf_dinov2.load(tmp_path / "src", scan=CASES[case["name"]]["scan"])
  assert overrides is None if "swiglu" in case["name"] else overrides["model.num_registers"] == 4  # qkv_bias=False
  hf_dinov2.export(params, tmp_path / "src", tmp_path / "out")
  back = _from_pretrained(tmp_path / "out")
  assert type(back) is type(case["model"])
  with torch.no_grad():
    ref, ref_masked = back(case["pixels"]), back(case["pixels"], bool_masked_pos=case["masked"])
  ours = _apply(model, params, _nhwc(case["pixels"]))
  ours_masked = _apply(model, params, _nhwc(case["pixels"]), jnp.asarray(case["masked"].numpy()))
  assert _max_diff(ours, ref.last_hidden_state) <= ATOL
  assert _max_diff(ours_masked, ref_masked.last_hidden_state) <= ATOL


def test_export_from_run_config(tmp_path):
  """A DINO run's encoder with fixed sin-cos positions and no LayerScale (both beyond HF's defaults)
  exports as the HF model that computes the same tokens; the conv stem and a pooled cls slot are
  refused in one line."""
  from configs import dino  # pylint: disable=import-outside-toplevel
  from medfm_jax.models import vit  # pylint: disable=import-outside-toplevel
  from tests import helpers  # pylint: disable=import-outside-toplevel
  c = dino.get_config("tiny")
  c.model.update(pos_embed="sincos2d", layer_scale_init=0.0, depth=2)
  c.data.image_size, c.data.channels = 16, 1
  model = vit.vit_from_config(c)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  params = helpers.random_params(jax.eval_shape(model.init, jax.random.key(2), images)["params"])
  hf_dinov2.export(params, c, tmp_path)
  back = _from_pretrained(tmp_path)
  with torch.no_grad():
    ref = back(torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())).last_hidden_state
  assert _max_diff(_apply(model, params, images), ref) <= ATOL
  c.model.update(patch_embed="conv", cls_pool="max")
  with pytest.raises(ValueError, match=r"^cannot export to HF Dinov2: model.patch_embed='conv' \(allowed 'patch'\); "
                                       r"model.cls_pool='max' \(allowed 'token'\)$"):
    hf_dinov2.export(params, c, tmp_path)
