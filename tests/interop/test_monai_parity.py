"""MONAI parity (the 'parity' extra): UNETR with shared random weights, and sliding-window
inference with Gaussian weighting, to <= 1e-5."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai = pytest.importorskip("monai")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from medfm_jax.evaluate import sliding_window  # noqa: E402
from medfm_jax.interop import monai_unetr  # noqa: E402

SIZE = (32, 32, 32)


@pytest.fixture(scope="module")
def monai_model():
  torch.manual_seed(0)
  model = monai.networks.nets.UNETR(1, 3, SIZE, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=2)
  with torch.no_grad():   # non-trivial norms and biases (MONAI initialises them to 1 / 0)
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.mark.slow
def test_unetr_matches_monai(monai_model):
  x = np.random.default_rng(0).standard_normal((2, 1, *SIZE)).astype(np.float32)
  with torch.no_grad():
    ref = monai_model(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 4, 1)
  model, params = monai_unetr.load_monai_unetr(monai_model.state_dict(), 1, 3, SIZE, hidden_size=24,
                                               mlp_dim=48, num_heads=2, feature_size=4)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 4, 1))))
  print("UNETR max |ours - MONAI|:", np.abs(ours - ref).max())
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_unetr_conversion_names_every_problem(monai_model):
  state = dict(monai_model.state_dict())
  state.pop("decoder2.conv_block.conv2.conv.weight")
  state["extra.weight"] = torch.zeros(1)
  with pytest.raises(ValueError, match=r"MONAI UNETR: unused HF tensors: extra.weight; .*unfilled params: "
                                       r"decoder/decoder1_block/conv2/kernel"):
    monai_unetr.load_monai_unetr(state, 1, 3, SIZE, hidden_size=24, mlp_dim=48, num_heads=2, feature_size=4)


@pytest.mark.parametrize("overlap,mode", [(0.5, "gaussian"), (0.25, "constant"), (0.6, "gaussian")])
def test_sliding_window_matches_monai(overlap, mode):
  from monai.inferers import sliding_window_inference  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(1).standard_normal((2, 1, 20, 23, 9)).astype(np.float32)
  w = np.random.default_rng(2).standard_normal((1, 3)).astype(np.float32)
  # A predictor that depends on the position inside the window, so the blending weights matter.
  ramp = np.linspace(-1, 1, 8, dtype=np.float32)
  bias = (ramp[:, None, None] + 2 * ramp[None, :, None] + 3 * ramp[None, None, :])

  def torch_predictor(t):
    out = torch.einsum("bcdhw,co->bodhw", t, torch.from_numpy(w))
    return torch.tanh(out + torch.from_numpy(bias[..., :t.shape[-1]]))

  with torch.no_grad():
    ref = sliding_window_inference(torch.from_numpy(x), (8, 8, 8), 3, torch_predictor, overlap=overlap,
                                   mode=mode).numpy().transpose(0, 2, 3, 4, 1)
  ours = sliding_window.sliding_window_inference(
      x.transpose(0, 2, 3, 4, 1), (8, 8, 8),
      lambda v: jnp.tanh(jnp.einsum("bdhwc,co->bdhwo", v, w) + bias[..., :v.shape[3], None]),
      overlap=overlap, mode=mode, batch_size=3)
  print(f"sliding window ({overlap}, {mode}) max |ours - MONAI|:", np.abs(np.asarray(ours) - ref).max())
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=0)
