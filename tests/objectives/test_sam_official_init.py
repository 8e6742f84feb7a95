"""A 'sam' run starts from official weights: objective.sam_checkpoint = a segment_anything state dict."""
import jax
import numpy as np
import pytest
import torch

from configs import sam as sam_config
from medfm_jax.interop import sam as sam_io
from medfm_jax.peft.lora import path_str
from medfm_jax.train import loop
from tests import helpers
from tests.interop import test_sam_parity as parity

S = parity.SIZES


def _flat(tree):
  return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow
def test_run_starts_from_a_segment_anything_checkpoint(tmp_path):
  """Meta's own modules write the .pth; after 2 steps with the image and prompt encoders frozen
  they still hold its values exactly, and the trained mask decoder is within 2 Adam steps of it."""
  path = tmp_path / "sam_tiny.pth"
  torch.save(parity._sa_model().state_dict(), path)
  c = sam_config.get_config(
      f"tiny,objective.encoder='vitdet',objective.sam_checkpoint='{path}',objective.freeze='frozen',"
      f"data.image_size={S['image_size']},data.channels=3,model.variant='Mu/{S['patch_size']}',"
      f"model.width={S['width']},model.depth={S['depth']},model.num_heads={S['num_heads']},"
      f"model.mlp_dim={S['mlp_dim']},batch_size=2,total_steps=2,warmup_steps=1,checkpoint_every=2,"
      "data.eval_examples=2,data.eval_batch_size=2,weight_decay=0.0,eval_every=0")   # no eval compiled
  c.model.sam.update(window_size=S["window_size"], global_attn_indexes=S["global_attn_indexes"],
                     prompt_dim=S["prompt_dim"], mask_in_chans=S["mask_in_chans"], decoder_heads=S["decoder_heads"],
                     decoder_mlp_dim=S["decoder_mlp_dim"], iou_head_hidden_dim=S["iou_head_hidden_dim"])
  state = loop.train(c, str(tmp_path / "run"), helpers.single_device_mesh(c))
  logged = helpers.read_metrics(str(tmp_path / "run"))
  assert [m["step"] for m in logged if "loss" in m] == [2]
  assert not any(k.startswith("eval/") for m in logged for k in m)   # eval_every=0: none at all
  _, official, _ = sam_io.load(str(path), decoder_heads=S["decoder_heads"])
  trained, official = _flat(jax.device_get(state.params)), _flat(official)
  assert set(trained) == set(official)
  frozen = [k for k in official if k.startswith(("image_encoder", "prompt_encoder"))]
  assert len(frozen) > 20 and all(np.array_equal(trained[k], official[k]) for k in frozen)
  step = max(float(np.abs(trained[k] - official[k]).max()) for k in official if k.startswith("mask_decoder"))
  assert 0 < step <= 2.5 * c.lr        # random init differs by ~0.1 (parity._randomize)
