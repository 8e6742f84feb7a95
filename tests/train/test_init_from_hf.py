"""``init_from`` / ``objective.lit_init_from`` = a public Hugging Face model (tiny, random): the run
adopts the model's fields, and its initial train state holds the imported weights (the position
grid resampled to the run's image size) where the recipe puts them; heads stay fresh."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from medfm_jax import interop, objectives
from medfm_jax.interop import hf_clip, hf_dinov2, hf_vitmae
from medfm_jax.models import layers
from medfm_jax.train import assemble, checkpoint, restore
from tests import helpers
from tests.objectives import test_flava

_TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _save(model, path, fixed=()):
  """Every parameter but the ``fixed`` ones perturbed (HF inits some to 0/1), then save_pretrained."""
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name not in fixed:
        p.add_(0.05 * torch.randn(p.shape, generator=g))
  model.save_pretrained(path)
  return str(path)


def _initial_state(config):
  restore.adopt_architecture(config)
  run = assemble.assemble(config, helpers.single_device_mesh(config))
  return jax.tree.map(np.asarray, run.init_state())


def _assert_tree_equal(ours, ref, atol=0.0):
  flat_ref = {restore.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(ref)}
  flat = {restore.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(ours)}
  assert flat.keys() == flat_ref.keys()
  for k, x in flat.items():
    np.testing.assert_allclose(x, flat_ref[k], rtol=0, atol=atol, err_msg=k)


def test_mae_continued_pretraining_from_vitmae(tmp_path):
  """RETFound: encoder and decoder (mask token included) from ViTMAEForPreTraining; the run's
  sizes come from the HF config."""
  hf = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
      **_TOWER, image_size=16, patch_size=4, num_channels=1, decoder_hidden_size=32, decoder_num_hidden_layers=1,
      decoder_num_attention_heads=4, decoder_intermediate_size=128))
  with torch.no_grad():   # HF's fixed sin-cos positions (transformers 5 random init leaves zeros)
    hf.vit.embeddings.position_embeddings.copy_(torch.from_numpy(layers.sincos_2d(32, 4, 4, cls_token=True)[None]))
    hf.decoder.decoder_pos_embed.copy_(torch.from_numpy(layers.sincos_2d(32, 4, 4, cls_token=True)[None]))
  source = _save(hf, tmp_path / "mae", fixed=(hf_vitmae.ENCODER_POS_EMBED, hf_vitmae.DECODER_POS_EMBED))
  config = helpers.tiny_mae_config(init_from=source)
  state = _initial_state(config)
  assert (config.model.width, config.model.depth, config.model.decoder_width) == (32, 2, 32)
  _assert_tree_equal(state.params, hf_vitmae.load(source)[1])


@pytest.mark.slow
def test_dinov2_teacher_and_student_from_dinov2_model(tmp_path):
  """DINOv2 continued pretraining: student and teacher backbones from Dinov2Model, positions
  resampled from HF's 6x6 grid to the run's 4x4 with HF's rule; the DINO head stays fresh."""
  hf = transformers.Dinov2Model(transformers.Dinov2Config(**_TOWER, image_size=24, patch_size=4, num_channels=3))
  source = _save(hf, tmp_path / "dinov2")
  config = helpers.tiny_dino_config(init_from=source)
  config.data.channels = 1                       # taken from the source
  state = _initial_state(config)
  assert config.data.channels == 3 and config.model.variant.endswith("/4") and config.data.image_size == 16
  ref = hf_dinov2.load(source, image_size=16)[1]
  ref.pop("mask_token")                           # the tiny DINO run has no iBOT mask token
  _assert_tree_equal(state.params["backbone"], ref)
  _assert_tree_equal(state.extra["teacher"]["backbone"], ref)
  fresh = _initial_state(helpers.tiny_dino_config(**{"model.width": 32, "model.depth": 2, "model.num_heads": 2,
                                                     "model.mlp_dim": 64, "data.channels": 3}))
  _assert_tree_equal(state.params["head"], fresh.params["head"])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_and_siglip_fine_tuning_from_hf(kind, tmp_path):
  """BiomedCLIP-style: every CLIPModel / SiglipModel weight into the run (the loss, the towers'
  sizes, pooling and heads adopted); the run tokenizer's end-of-text id is the HF one."""
  vision = dict(_TOWER, image_size=16, patch_size=4, num_channels=1)
  text = dict(_TOWER, vocab_size=300, max_position_embeddings=80, eos_token_id=258)
  if kind == "clip":
    hf = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=24))
  else:
    hf = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=dict(text, projection_size=32)))
  source = _save(hf, tmp_path / kind)
  config = helpers.tiny_clip_config(init_from=source)
  state = _initial_state(config)
  assert config.objective.loss == kind and config.model.patch_embed == "patch"
  _assert_tree_equal(state.params, hf_clip.load(source)[1])


def test_lit_with_an_hf_dinov2_tower(tmp_path):
  """LiT: the locked image tower from Dinov2Model (its fields adopted into model.*)."""
  hf = transformers.Dinov2Model(transformers.Dinov2Config(**_TOWER, image_size=16, patch_size=4, num_channels=1))
  source = _save(hf, tmp_path / "dinov2")
  config = helpers.tiny_clip_config(**{"objective.lit_init_from": source})
  state = _initial_state(config)
  ref = hf_dinov2.load(source)[1]
  ref.pop("mask_token")
  _assert_tree_equal(state.params["image"], ref)


def test_finetune_from_hf_encoder(tmp_path):
  """Evaluation / fine-tuning: the CLIP vision tower of an HF CLIPModel as the backbone, with its
  positions resampled to the run's 8x8 grid (fit_encoder)."""
  hf = transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=dict(_TOWER, image_size=16, patch_size=4, num_channels=1),
      text_config=dict(_TOWER, vocab_size=50, max_position_embeddings=8), projection_dim=24))
  source = _save(hf, tmp_path / "clip")
  config = helpers.tiny_eval_config("finetune", init_from=source, **{"data.image_size": 32})
  restore.adopt_architecture(config)
  assert config.model.ln_pre and config.model.width == 32
  objective = objectives.build(config, encoder_loader=restore.pretrained_encoder)
  image = hf_clip.load(source)[1]["image"]
  fitted = objective._pretrained   # pylint: disable=protected-access
  assert fitted["pos_embed"].shape == (1, 64, 32)
  np.testing.assert_array_equal(fitted["encoder/layer_1/mlp/fc2/kernel"], image["encoder"]["layer_1"]["mlp"]["fc2"]["kernel"])


def test_mismatch_is_one_line(tmp_path):
  """A source the run cannot take: one line naming the problem."""
  hf = transformers.Dinov2Model(transformers.Dinov2Config(**_TOWER, image_size=16, patch_size=4, qkv_bias=False))
  source = _save(hf, tmp_path / "dinov2")
  config = helpers.tiny_dino_config(init_from=source)
  with pytest.raises(checkpoint.CheckpointError, match=r"^init_from=.*qkv_bias=False[^\n]*$"):
    restore.adopt_architecture(config)
  (tmp_path / "odd").mkdir()
  (tmp_path / "odd" / "config.json").write_text('{"model_type": "bert"}')
  with pytest.raises(checkpoint.CheckpointError, match=r"^init_from=.*model_type='bert'; supported .*$"):
    restore.adopt_architecture(helpers.tiny_mae_config(init_from=str(tmp_path / "odd")))
  assert interop.hf_family(str(tmp_path)) is None


@pytest.mark.slow
def test_main_cli_starts_a_run_from_hf(tmp_path):
  """``python -m medfm_jax.main --config.init_from=HF_DIR``: the run adopts the HF model's fields
  (saved in its checkpoint config) and trains."""
  hf = transformers.Dinov2Model(transformers.Dinov2Config(**_TOWER, image_size=24, patch_size=4, num_channels=1))
  source = _save(hf, tmp_path / "dinov2")
  workdir = tmp_path / "run"
  result = helpers.run_cli([
      "--config=configs/mae.py:tiny", f"--workdir={workdir}", f"--config.init_from={source}",
      "--config.data.image_size=16", "--config.batch_size=8", "--config.total_steps=2",
      "--config.warmup_steps=1", "--config.log_every=1", "--config.checkpoint_every=2",
      "--config.eval_every=1000", "--config.data.eval_examples=16", "--config.data.eval_batch_size=8",
      "--config.model.decoder_width=32", "--config.model.decoder_depth=1", "--config.model.decoder_heads=4"])
  assert result.returncode == 0, result.stderr[-2000:]
  saved = checkpoint.read_meta(str(workdir))["config"]
  assert (saved["model"]["width"], saved["model"]["depth"], saved["model"]["pos_embed"]) == (32, 2, "learned")
  assert np.isfinite([m["loss"] for m in helpers.read_metrics(str(workdir)) if "loss" in m][-1])


def test_open_clip_and_timm_sources(tmp_path):
  """An open_clip directory starts a CLIP run (the whole model); a timm ViT directory gives a DINO
  run's student and teacher (its fields adopted, the positions resampled to the run's grid)."""
  import open_clip  # pylint: disable=import-outside-toplevel  (the 'parity' extra)
  import timm  # pylint: disable=import-outside-toplevel
  from medfm_jax.interop import openclip, timm_vit  # pylint: disable=import-outside-toplevel
  model_cfg = dict(embed_dim=24, vision_cfg=dict(layers=2, width=32, head_width=16, mlp_ratio=2.0, patch_size=4,
                                                 image_size=16),
                   text_cfg=dict(context_length=80, vocab_size=300, width=32, heads=2, layers=1))
  oc = open_clip.model.CLIP(embed_dim=24, vision_cfg=open_clip.model.CLIPVisionCfg(**model_cfg["vision_cfg"]),
                            text_cfg=open_clip.model.CLIPTextCfg(**model_cfg["text_cfg"]))
  (tmp_path / "oc").mkdir()
  torch.save(oc.state_dict(), tmp_path / "oc" / "open_clip_pytorch_model.bin")
  (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
  config = helpers.tiny_clip_config(init_from=str(tmp_path / "oc"), **{"data.channels": 3})
  state = _initial_state(config)
  assert config.model.text.pooling == "argmax" and config.model.activation == "gelu"
  _assert_tree_equal(state.params, openclip.load(tmp_path / "oc")[1])
  vit_model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=24, patch_size=4,
                                embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, in_chans=1)
  source = tmp_path / "timm"
  timm_vit.export(timm_vit.load(vit_model)[1], vit_model, source)
  config = helpers.tiny_dino_config(init_from=str(source))
  state = _initial_state(config)
  ref = restore.fit_encoder(nn.unbox(state.params["backbone"]), timm_vit.load(source)[1], "timm")
  assert ref["pos_embed"].shape == (1, 16, 32)
  _assert_tree_equal(state.extra["teacher"]["backbone"], traverse_util.unflatten_dict(ref, sep="/"), atol=1e-7)


def _biomedclip_run_source(tmp_path):
  from tests.interop.test_openclip_parity import _biomedclip_source  # pylint: disable=import-outside-toplevel  (torch, open_clip)
  return _biomedclip_source(tmp_path, "cls_last_hidden_state_pooler", "mlp", "linear", vocab=300, positions=96)[1]


@pytest.mark.slow
def test_clip_run_from_a_biomedclip_layout_open_clip_dir_and_back(tmp_path):
  """BiomedCLIP: an open_clip directory with a timm trunk and a BERT text tower starts a CLIP run
  (the whole model: post-LN text tower, 'mlp' projection, timm ViT fields adopted). The run's
  config exports its params (``export --format=open_clip``'s path: a timm trunk and a BERT tower
  named in the config) and open_clip computes our features from the files (<= 1e-5; padding:
  open_clip's tokens != 0, ours the run's pad-id mask)."""
  import open_clip  # pylint: disable=import-outside-toplevel  (the 'parity' extra)
  from medfm_jax.interop import openclip  # pylint: disable=import-outside-toplevel
  source = _biomedclip_run_source(tmp_path)
  config = helpers.tiny_clip_config(init_from=str(source))
  params = _initial_state(config).params
  assert config.model.text.post_ln and config.model.text.embed_norm and config.model.text_proj == "mlp"
  assert not config.model.ln_pre and config.model.layer_norm_eps == 1e-6 and config.model.text.context_length == 96
  _assert_tree_equal(params, openclip.load(source)[1])
  params["text"]["embed_norm"]["bias"] = params["text"]["embed_norm"]["bias"] + 0.1   # not the source's
  openclip.export(params, config, tmp_path / "out")
  back = open_clip.create_model(f"local-dir:{tmp_path / 'out'}").eval()
  model = objectives.build(config).model
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  tokens = np.zeros((2, 80), np.int64)
  tokens[0, :5], tokens[1, :9] = rng.integers(1, 259, 5), rng.integers(1, 259, 9)
  with jax.default_matmul_precision("highest"):   # one compile, not one per eager op
    img, txt = jax.jit(model.apply)({"params": params}, images, tokens.astype(np.int32))
  with torch.no_grad():
    ref_img = back.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    ref_txt = back.encode_text(torch.from_numpy(tokens)).numpy()
  assert np.abs(np.asarray(img) - ref_img).max() <= 1e-5 and np.abs(np.asarray(txt) - ref_txt).max() <= 1e-5


@pytest.mark.slow
def test_siglip_run_from_an_open_clip_siglip_dir_and_back(tmp_path):
  """open_clip's SigLIP layout starts a SigLIP run: the loss, MAP pooling, no class token, the
  biased text head and every weight (logit bias included) adopted. The run config exports
  (``--format=open_clip``'s path) what open_clip loads and computes our features with (<= 1e-5)."""
  import open_clip  # pylint: disable=import-outside-toplevel  (the 'parity' extra)
  from medfm_jax.interop import openclip  # pylint: disable=import-outside-toplevel
  from tests.interop.test_openclip_parity import _siglip_source  # pylint: disable=import-outside-toplevel
  _, source = _siglip_source(tmp_path, vocab_size=300, context_length=80)
  config = helpers.tiny_clip_config(init_from=str(source))
  params = _initial_state(config).params
  assert config.objective.loss == "siglip" and config.model.image_pool == "map" and not config.model.class_token
  assert config.model.text_proj_bias and config.model.text.pooling == "last" and not config.model.text.causal
  _assert_tree_equal(params, openclip.load(source)[1])
  openclip.export(params, config, tmp_path / "out")
  back = open_clip.create_model(f"local-dir:{tmp_path / 'out'}").eval()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  tokens = rng.integers(1, 259, (2, 80))
  with jax.default_matmul_precision("highest"):   # one compile, not one per eager op
    img, txt = jax.jit(objectives.build(config).model.apply)({"params": params}, images, tokens.astype(np.int32))
  with torch.no_grad():
    ref_img = back.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    ref_txt = back.encode_text(torch.from_numpy(tokens)).numpy()
  assert np.abs(np.asarray(img) - ref_img).max() <= 1e-5 and np.abs(np.asarray(txt) - ref_txt).max() <= 1e-5


def _flava_source(tmp_path, cls, depth=2, text_vocab=300, projection_dim=24):
  """A tiny random HF FLAVA (``cls``: FlavaModel or FlavaForPreTraining) whose MIM heads, if any,
  predict 40 codebook ids; image and text towers of ``depth`` blocks."""
  tower = dict(_TOWER, num_hidden_layers=depth)
  config = transformers.FlavaConfig(
      image_config=dict(tower, image_size=16, patch_size=4, num_channels=1, vocab_size=40),
      text_config=dict(tower, vocab_size=text_vocab, max_position_embeddings=80),
      multimodal_config=dict(_TOWER, num_hidden_layers=1), hidden_size=32, projection_dim=projection_dim,
      init_codebook=False)
  return _save(cls(config), tmp_path / cls.__name__)


@pytest.mark.parametrize("cls", ["FlavaForPreTraining", "FlavaModel"])
def test_flava_run_from_hf_keeps_unfit_heads_fresh(cls, tmp_path, caplog):
  """A pixel-target FLAVA run from FlavaForPreTraining / FlavaModel: every tensor of the source is
  imported but the heads that it lacks (FlavaModel: all) or holds in other shapes (HF's MIM /
  MMM-image heads predict 40 codebook ids, the run's 4x4x1 pixels): those keep their fresh init,
  said in one log line. The run starts from the tiny recipe's image tower (conv stem, max-pooled
  cls slot, LayerScale), which the source's plain ViT replaces."""
  from medfm_jax.interop import hf_flava  # pylint: disable=import-outside-toplevel
  source = _flava_source(tmp_path, getattr(transformers, cls))
  recipe_tower = {"model.patch_embed": "conv", "model.cls_pool": "max", "model.layer_scale_init": 0.1}
  with caplog.at_level("WARNING"):
    state = _initial_state(helpers.tiny_flava_config(init_from=source, **recipe_tower))
  ref = hf_flava.load(source)[1]
  heads = objectives.resolve("flava").hf_optional_heads
  fresh = ("mim_head", "mmm_image_head") if cls == "FlavaForPreTraining" else heads
  assert state.params["mim_head"]["decoder"]["kernel"].shape == (32, 16) and set(heads) <= set(state.params)
  _assert_tree_equal({k: v for k, v in state.params.items() if k not in fresh}, {k: v for k, v in ref.items() if k not in fresh})
  lines = [r.getMessage() for r in caplog.records if "fresh init for the heads" in r.getMessage()]
  expected = ("mim_head, mmm_image_head (other shapes in the source" if cls == "FlavaForPreTraining" else
              "mim_head, mmm_image_head, mlm_head, mmm_text_head, itm_head (not in the source)")
  assert len(lines) == 1 and expected in lines[0] and lines[0].count("(") == 1, lines


@helpers.xdist_group_of(test_flava.test_learning_signal_ci_and_restore, "flava")
@pytest.mark.slow
def test_flava_run_from_flava_model_trains(tmp_path):
  """FLAVA end to end from an HF ``FlavaModel`` directory: the run adopts its towers (here over a
  config that asks for other ones) and trains 2 steps (heads fresh) to a finite loss; the
  checkpoint's config holds the adopted fields. The source has the shapes of the FLAVA learning
  test (tests/objectives/test_flava.py: 1-block towers, embeddings of 32, the byte tokenizer's 260
  ids) and the run its batch and eval sizes, so the two share their compiled programs."""
  from medfm_jax.train import loop  # pylint: disable=import-outside-toplevel
  source = _flava_source(tmp_path, transformers.FlavaModel, depth=1, text_vocab=260, projection_dim=32)
  config = helpers.tiny_flava_config(**{
      **test_flava.LEARNING_RUN, "init_from": source, "total_steps": 2, "checkpoint_every": 2,
      "model.depth": 2, "model.text.depth": 2, "model.embed_dim": 24, "model.text.vocab_size": 300})
  restore.adopt_architecture(config)
  loop.train(config, str(tmp_path / "run"), helpers.single_device_mesh(config))
  saved = checkpoint.read_meta(str(tmp_path / "run"))["config"]["model"]
  assert (saved["depth"], saved["text"]["depth"], saved["embed_dim"], saved["text"]["vocab_size"],
          saved["multimodal"]["width"], saved["text"]["context_length"]) == (1, 1, 32, 260, 32, 80)
  assert np.isfinite([m["loss"] for m in helpers.read_metrics(str(tmp_path / "run")) if "loss" in m][-1])
