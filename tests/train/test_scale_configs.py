"""The paper configs run on a pod by changing config values only: validated, sharded, traceable.

Abstract only (``jax.eval_shape`` / ``lower``): nothing of ViT-H size is allocated on the CPU.
"""
import jax
import numpy as np
import pytest

from configs import mae
from medfm_jax import config as config_lib
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.train import assemble

# Encoder parameter counts of the MAE paper's models (timm ViT without head), in millions.
_ENCODER_PARAMS_M = {"vit_b16": 85.8, "vit_l16": 303.3, "vit_h14": 630.8}


def _assembly(variant):
  """(config, the run's assembly) of the paper config on an fsdp=8 mesh (abstract only)."""
  config = mae.get_config(f"{variant},mesh.fsdp=8,dtype=bfloat16")
  assert config_lib.validate(config, None, num_devices=8) == {"data": 1, "fsdp": 8, "tensor": 1}
  mesh = mesh_lib.make_mesh(config.mesh)
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, 224, 224, 3), np.float32)}
  return config, assemble.assemble(config, mesh, batch)


@pytest.mark.parametrize("variant", sorted(_ENCODER_PARAMS_M))
def test_paper_config_is_fsdp_sharded(variant):
  config, assembly = _assembly(variant)
  abstract = assembly.abstract_state
  enc = abstract.params["encoder"]
  n_enc = sum(np.prod(x.shape) for x in jax.tree.leaves(enc)) / 1e6
  np.testing.assert_allclose(n_enc, _ENCODER_PARAMS_M[variant], rtol=0.005)
  # Every matrix is split 8-ways; per-device parameter bytes are ~1/8 of the total.
  total = per_device = 0
  for path, x in jax.tree_util.tree_flatten_with_path(abstract.params)[0]:
    total += np.prod(x.shape)
    per_device += np.prod(x.sharding.shard_shape(x.shape))
    if path[-1].key == "kernel":
      assert "fsdp" in str(x.sharding.spec), (path, x.shape, x.sharding.spec)
  assert per_device < total / 7.5
  assert config.model.decoder_width == 512 and config.model.decoder_depth == 8


@pytest.mark.slow
def test_vit_b16_bf16_train_step_traces_on_8_devices():
  hlo = _assembly("vit_b16")[1].lower().as_text()
  assert "bf16" in hlo and '"fsdp"' in hlo     # bf16 compute; fsdp sharding annotations
