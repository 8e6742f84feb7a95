"""``python -m medfm_jax.export``: a run's checkpoint -> a transformers directory whose model computes
what ours computes (<= 1e-5, float32)."""
import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from medfm_jax import export, objectives
from medfm_jax.models import mae as mae_model
from medfm_jax.models import vit
from medfm_jax.peft import lora
from medfm_jax.train import checkpoint as ckpt_lib
from tests import helpers


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.slow
def test_cli_exports_an_mae_run(mae_ckpt, tmp_path):
  """The tiny MAE run -> ViTMAEForPreTraining.from_pretrained (no missing / unexpected keys): the
  same predictions and norm-pix loss on the same noise; an absent --step is one line."""
  out = tmp_path / "hf"
  result = helpers.run_cli([f"--workdir={mae_ckpt}", "--format=hf", f"--out={out}", "--step=4"],
                           module="medfm_jax.export")
  assert result.returncode == 0, result.stderr[-2000:]
  back, info = transformers.ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  config = ml_collections.ConfigDict(ckpt_lib.read_meta(mae_ckpt)["config"])
  m = config.model
  model = mae_model.MaskedAutoencoder(vit.vit_from_config(config), m.decoder_width, m.decoder_depth,
                                      m.decoder_heads)
  params = ckpt_lib.restore_subtree(mae_ckpt, ("params",))
  s, c, p = config.data.image_size, config.data.channels, vit.size_from_config(m).patch_size
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, s, s, c)).astype(np.float32)
  noise = rng.random((2, (s // p) ** 2)).astype(np.float32)
  with torch.no_grad():
    ref = back.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), noise=torch.from_numpy(noise))
  with jax.default_matmul_precision("highest"):
    ours = model.apply({"params": params}, images, noise, config.objective.mask_ratio)
  np.testing.assert_array_equal(np.asarray(ours["mask"]), ref.mask.numpy())
  assert _max_diff(ours["pred"], ref.logits) <= 1e-5
  with pytest.raises(ckpt_lib.CheckpointError, match=r"^--step=7: .* has no checkpoints/7$"):
    export.export_run(mae_ckpt, str(tmp_path / "x"), step=7)


@pytest.mark.slow
def test_lora_fine_tune_is_merged(tmp_path):
  """A LoRA fine-tune's checkpoint (non-zero adapters) exports its encoder with the adapters merged:
  Dinov2Model.from_pretrained computes our adapted encoder's tokens, not the base encoder's."""
  config = helpers.tiny_eval_config("finetune", "lora")
  objective = objectives.build(config)
  images = np.random.default_rng(0).normal(size=(2, 16, 16, config.data.channels)).astype(np.float32)
  params = helpers.random_params(jax.eval_shape(objective.init, jax.random.key(0), {"image": images})[0],
                                 std=0.2)   # random adapters (b = 0 at init would merge to nothing)
  ckpt_lib.export_params(str(tmp_path / "run"), 3, params, {"step": 3, "config": config.to_json_best_effort()})
  export.export_run(str(tmp_path / "run"), str(tmp_path / "hf"))
  back = transformers.Dinov2Model.from_pretrained(tmp_path / "hf").eval()
  with torch.no_grad():
    ref = back(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).last_hidden_state.numpy()
  backbone = objective.model.backbone
  with jax.default_matmul_precision("highest"):
    adapted = backbone.apply({"params": lora.apply(params["backbone"], params["lora"], objective.lora_spec)}, images)
    base = backbone.apply({"params": params["backbone"]}, images)
  assert _max_diff(adapted, ref) <= 1e-5
  assert _max_diff(base, ref) > 1e-2


@pytest.mark.slow
def test_timm_format_exports_the_image_encoder(mae_ckpt, tmp_path):
  """--format=timm: the tiny MAE run's encoder (fixed sin-cos positions written as timm's learned
  ones) -> timm.create_model('local-dir:...') computes our tokens; open_clip refuses an MAE run."""
  import timm  # pylint: disable=import-outside-toplevel  (the 'parity' extra)
  export.export_run(mae_ckpt, str(tmp_path), fmt="timm")
  back = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
  config = ml_collections.ConfigDict(ckpt_lib.read_meta(mae_ckpt)["config"])
  s, c = config.data.image_size, config.data.channels
  images = np.random.default_rng(0).normal(size=(2, s, s, c)).astype(np.float32)
  with torch.no_grad():
    ref = back.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  params = ckpt_lib.restore_subtree(mae_ckpt, ("params", "encoder"))
  with jax.default_matmul_precision("highest"):
    ours = vit.vit_from_config(config).apply({"params": params}, images)
  assert _max_diff(ours, ref) <= 1e-5
  with pytest.raises(export.ConfigError, match=r"^--format=open_clip: only CLIP runs \(objective 'clip'\), not 'mae'$"):
    export.export_run(mae_ckpt, str(tmp_path / "x"), fmt="open_clip")


@pytest.mark.slow
def test_dino_run_exports_its_teacher(tmp_path):
  """A DINO run exports the teacher (extra/teacher/backbone), not the student: the tiny DINOv2
  recipe's encoder (LayerScale, mask token) -> Dinov2Model.from_pretrained computes its tokens."""
  config = helpers.tiny_dino_config("tiny_v2")
  model = vit.vit_from_config(config)
  images = np.random.default_rng(0).normal(size=(2, 16, 16, config.data.channels)).astype(np.float32)
  teacher = helpers.random_params(jax.eval_shape(model.init, jax.random.key(0), images)["params"])
  student = jax.tree.map(lambda x: x + 1.0, teacher)
  saver = ckpt_lib.Checkpointer(str(tmp_path / "run"), keep=1, async_save=False)
  saver.save(2, {"params": {"backbone": student}, "extra": {"teacher": {"backbone": teacher}}}, None,
             {"step": 2, "config": config.to_json_best_effort()})
  saver.close()
  export.export_run(str(tmp_path / "run"), str(tmp_path / "hf"), step=2)
  back = transformers.Dinov2Model.from_pretrained(tmp_path / "hf").eval()
  with torch.no_grad():
    ref = back(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).last_hidden_state.numpy()
  with jax.default_matmul_precision("highest"):
    assert _max_diff(model.apply({"params": teacher}, images), ref) <= 1e-5
