import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax.models import mae, vit
from tests.helpers import random_params


def test_random_masking_invariants():
  noise = np.random.default_rng(0).random((4, 49), np.float32)
  keep, mask, restore = mae.random_masking(noise, 0.75)
  assert keep.shape == (4, 12)                                # int(49 * 0.25)
  np.testing.assert_array_equal(mask.sum(1), 37)
  for b in range(4):
    # Kept patches are the 12 smallest-noise ones, and exactly those are unmasked.
    np.testing.assert_array_equal(np.sort(keep[b]), np.sort(np.argsort(noise[b])[:12]))
    np.testing.assert_array_equal(np.flatnonzero(mask[b] == 0), np.sort(keep[b]))
    # restore is the inverse permutation of the shuffle.
    shuffle = np.argsort(noise[b])
    np.testing.assert_array_equal(shuffle[restore[b]], np.arange(49))


def test_loss_on_hand_computable_input():
  # One 2x2 image, patch 1 (4 patches of 1 pixel, 1 channel): target = pixel values.
  images = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2, 1)
  pred = jnp.zeros((1, 4, 1))
  mask = jnp.array([[1.0, 0.0, 1.0, 0.0]])
  # Masked patches 0 and 2: squared errors 1 and 9 -> mean 5.
  assert float(mae.mae_loss(images, pred, mask, 1, norm_pix_loss=False)) == 5.0
  # visible_weight adds w x the visible patches' mean (patches 1 and 3: (4 + 16) / 2 = 10).
  assert float(mae.mae_loss(images, pred, mask, 1, norm_pix_loss=False, visible_weight=0.5)) == 10.0
  # norm_pix_loss: per patch (x - mean)/sqrt(var_unbiased + 1e-6) over a 2-pixel patch (patch 1, 2 channels).
  images2 = jnp.array([[1.0, 3.0], [2.0, 2.0]]).reshape(1, 1, 2, 2)
  pred2 = jnp.zeros((1, 2, 2))
  target0 = np.array([-1.0, 1.0]) / np.sqrt(2.0 + 1e-6)       # unbiased var of (1, 3) is 2
  expected = np.mean(target0 ** 2)                            # patch 1 has var 0 -> target 0, unmasked anyway
  got = mae.mae_loss(images2, pred2, jnp.array([[1.0, 0.0]]), 1, norm_pix_loss=True)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("encoder_tokens", ["visible", "all"])
def test_masked_patches_do_not_reach_encoder(encoder_tokens):
  # 'all': the encoder sees every position, the masked ones as its mask token (SimMIM, nnssl).
  encoder = vit.VisionTransformer("Mu/4", image_size=16, mask_token=encoder_tokens == "all")
  model = mae.MaskedAutoencoder(encoder, 32, 1, 4, encoder_tokens=encoder_tokens)
  rng = np.random.default_rng(0)   # numpy: each jax.random shape compiles a program of its own
  x = rng.standard_normal((1, 16, 16, 1)).astype(np.float32)
  noise = rng.random((1, 16), np.float32)
  variables = random_params(jax.eval_shape(functools.partial(model.init, mask_ratio=0.75), jax.random.key(2), x, noise))
  apply = jax.jit(model.apply, static_argnums=3)   # one compile (eagerly, each op compiles on its own)
  out = apply(variables, x, noise, 0.75)
  assert out["latent"].shape == (1, 1 + (4 if encoder_tokens == "visible" else 16), 96)
  assert out["pred"].shape == (1, 16, 16)
  # Changing a masked patch changes nothing in the latent; changing a visible one does.
  masked_patch = int(np.flatnonzero(out["mask"][0])[0])
  visible_patch = int(np.flatnonzero(out["mask"][0] == 0)[0])
  def perturb(i):
    r, c = divmod(i, 4)
    y = x.copy()
    y[:, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 5.0
    return y
  np.testing.assert_array_equal(apply(variables, perturb(masked_patch), noise, 0.75)["latent"], out["latent"])
  assert not np.allclose(apply(variables, perturb(visible_patch), noise, 0.75)["latent"], out["latent"])
