"""Each evaluation protocol end to end on a tiny MAE checkpoint (shared session fixture)."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from medfm_jax import config as config_lib
from medfm_jax.data import pipeline
from medfm_jax.evaluate import closing, embed, features, probe, protocols, results as results_lib
from medfm_jax.metrics import fewshot as fewshot_lib
from medfm_jax.metrics import knn as knn_lib
from medfm_jax.peft import lora
from medfm_jax.train import checkpoint as ckpt_lib
from medfm_jax.train import loop, restore
from tests import helpers
from tests.metrics import test_fewshot, test_knn


def _config(protocol, variant="tiny", **overrides):
  c = helpers.tiny_eval_config(protocol, variant, **overrides)
  restore.adopt_architecture(c)
  config_lib.validate(c)
  protocols.check_config(c)
  return c


def _check_summary(results, n=64, classes=6, summary=None):
  """Sizes, and ``summary`` (default: the metrics; few-shot: its seed 0, whose per-class table is
  reported) is the per-class table's: accuracy = support-weighted recall, balanced accuracy =
  mean recall, macro AUROC = mean AUROC, over the classes present."""
  m = results["metrics"]
  summary = summary or m
  assert m["num_examples"] == n and len(m["per_class"]) == classes
  assert sum(r["support"] for r in m["per_class"]) == n
  present = [r for r in m["per_class"] if r["support"]]
  assert summary["accuracy"] == pytest.approx(sum(r["recall"] * r["support"] for r in present) / n)
  assert summary["balanced_accuracy"] == pytest.approx(np.mean([r["recall"] for r in present]))
  assert summary["macro_auroc"] == pytest.approx(np.nanmean([r["auroc"] for r in m["per_class"]]))


def linear_probe_run(workdir, init_from, seed=0, random_init=False):
  """The modality linear probe of :func:`test_feature_protocols` on checkpoint ``init_from`` (with
  ``random_init``: its architecture, randomly initialised); ``seed`` seeds the init and the probe
  (``tools/seed_spread.py`` varies it)."""
  c = _config("linear_probe", init_from=init_from,
              **{"data.label": "modality", "seed": seed, "probe.seed": seed})
  if random_init:
    c.init_from = ""
  return protocols.run(c, workdir)


@pytest.mark.slow
def test_feature_protocols(mae_ckpt, tmp_path, monkeypatch):
  # Modality is linearly decodable from the phantoms (a raw-pixel probe scores 0.99): a probe far
  # above what misaligned rows score shows that features and labels are aligned. It does not show
  # that the 4-step checkpoint was restored or learned anything: its random-init architecture
  # scores as well (restoring is checked bitwise below). Seeds 0/1/2/3/4 (tools/seed_spread.py
  # --scenarios probe): checkpoint 0.83 / 0.88 / 0.81 / 0.78 / 0.83, random init
  # 0.73 / 0.83 / 0.77 / 0.77 / 0.84, train labels shuffled 0.16 / 0.14 / 0.45 / 0.17 / 0.42.
  probe = linear_probe_run(str(tmp_path / "lp"), mae_ckpt)
  _check_summary(probe, classes=4)
  assert probe["metrics"]["accuracy"] > 0.6
  calls, real_knn = [], knn_lib.knn_predict
  monkeypatch.setattr(knn_lib, "knn_predict", lambda *a, **kw: calls.append((a, kw)) or real_knn(*a, **kw))
  c = _config("knn", init_from=mae_ckpt, **{"features.pool": "mean"})
  knn = protocols.run(c, str(tmp_path / "knn"))
  _check_summary(knn)
  assert knn["k"] == 20
  # The accuracy recomputed in float64 from the features the protocol classified, with the labels
  # read from the source: rows, labels, k and temperature all reach the vote.
  ((train_x, train_y, test_x, classes), kw), = calls
  train_src, test_src = (pipeline.make_source(c.data, s) for s in (c.data.train_split, c.data.eval_split))
  np.testing.assert_array_equal(train_y, [train_src[i]["finding"] for i in range(len(train_x))])
  assert (len(train_x), len(test_x), classes, kw["k"], kw["temperature"]) == (256, 64, 6, 20, 0.07)
  want = test_knn.numpy_knn(train_x, train_y, test_x, classes, 20, 0.07).argmax(-1)
  assert knn["metrics"]["accuracy"] == np.mean(want == [test_src[i]["finding"] for i in range(64)])
  few = protocols.run(_config("fewshot", init_from=mae_ckpt), str(tmp_path / "few"))
  _check_summary(few, summary=few["seeds"][0])
  assert len(few["seeds"]) == 2 and few["shots"] == 10
  assert few["metrics"]["accuracy"] == pytest.approx(np.mean([s["accuracy"] for s in few["seeds"]]))
  assert few["std"]["accuracy"] == pytest.approx(np.std([s["accuracy"] for s in few["seeds"]]))
  json_path, md_path = results_lib.write(str(tmp_path / "few"), few)
  assert json.load(open(json_path))["metrics"]["per_class"][0]["class"] == "none"
  assert "| accuracy | " in open(md_path).read() and "± " in open(md_path).read()
  # Nearest centroid: each seed's support draw, centred on the whole pool's mean, gives the
  # accuracy of the float64 reference loop (tests/metrics/test_fewshot.py).
  c = _config("fewshot", init_from=mae_ckpt, **{"fewshot.classifier": "centroid", "fewshot.shots": 1,
                                                 "data.label": "modality"})
  calls, real_centroid = [], fewshot_lib.centroid_scores
  monkeypatch.setattr(fewshot_lib, "centroid_scores",
                      lambda *a: calls.append(a) or real_centroid(*a))
  centroid = protocols.run(c, str(tmp_path / "centroid"))
  (pool_x, _), (_, query_y) = protocols._frozen_features(c, helpers.single_device_mesh(c))  # pylint: disable=protected-access
  assert len(calls) == 2 and centroid["classifier"] == "centroid"
  for (support_x, support_y, query_x, classes, centre), seed in zip(calls, centroid["seeds"]):
    assert (len(support_x), classes) == (4, 4) and sorted(support_y) == [0, 1, 2, 3]
    np.testing.assert_allclose(centre, pool_x.astype(np.float64).mean(0))
    want = test_fewshot.reference_predictions(support_x, support_y, query_x, centre, 4)
    assert seed["accuracy"] == np.mean(want == query_y["modality"])


@pytest.mark.slow
def test_random_init_baseline_differs_from_checkpoint(mae_ckpt, tmp_path):
  mesh = helpers.single_device_mesh(None)
  _, pretrained = features.build_classifier(_config("knn", init_from=mae_ckpt), mesh)
  _, random = features.build_classifier(_config("knn"), mesh)
  encoder = restore.load_encoder(mae_ckpt)[0]
  np.testing.assert_array_equal(pretrained["backbone"]["patch_embed"]["proj"]["kernel"],
                                encoder["patch_embed"]["proj"]["kernel"])
  assert not np.array_equal(random["backbone"]["patch_embed"]["proj"]["kernel"],
                            encoder["patch_embed"]["proj"]["kernel"])


@pytest.mark.slow
def test_finetune_lora_trains_only_adapters_and_head(mae_ckpt, tmp_path):
  c = _config("finetune", "lora", init_from=mae_ckpt)
  workdir = str(tmp_path / "ft")
  results = protocols.run(c, workdir)
  _check_summary(results)
  assert results["steps"] == 4 and results["scheme"] == "lora"
  trained = ckpt_lib.restore_subtree(os.path.join(workdir, "finetune"), ("params",))
  encoder = restore.load_encoder(mae_ckpt)[0]
  # Base weights bitwise identical to the pretrained encoder; adapters moved off zero.
  jax.tree.map(np.testing.assert_array_equal, trained["backbone"], encoder)
  pairs = lora._flatten_adapters(trained["lora"])  # pylint: disable=protected-access
  assert len(pairs) == 2 * 2 and all(np.abs(ab["b"]).max() > 0 for ab in pairs.values())
  n_lora = lora.count_params(trained["lora"])
  n_head = sum(x.size for x in jax.tree.leaves(trained["head"]))
  assert results["trainable_params"] == n_lora + n_head
  # The export is a plain classifier checkpoint with LoRA merged in; it restores as 'supervised'.
  exported = ckpt_lib.restore_subtree(results["export"], ("params",))
  assert set(exported) == {"backbone", "head"}
  spec = lora.LoraSpec(c.objective.lora_rank, c.objective.lora_alpha, False, tuple(c.objective.lora_targets))
  merged = lora.merge(trained["backbone"], trained["lora"], spec)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), exported["backbone"], merged)
  assert restore.checkpoint_objective(results["export"])[0] == "supervised"


@pytest.mark.slow
def test_zero_shot_needs_a_text_tower(mae_ckpt):
  with pytest.raises(protocols.EvalError, match="objective 'mae', which has no text tower"):
    protocols.run(_config("zero_shot", init_from=mae_ckpt), "/tmp/unused")
  with pytest.raises(protocols.EvalError, match="set --config.init_from"):
    protocols.run(_config("zero_shot"), "/tmp/unused")


@pytest.mark.slow
def test_cli_knn_writes_results(mae_ckpt, tmp_path):
  workdir = str(tmp_path / "cli")
  args = ["--config=configs/eval/knn.py:tiny,data.image_size=16,data.eval_examples=64,"
          "features.train_examples=128,features.batch_size=64,knn.k=5",
          f"--config.init_from={mae_ckpt}", f"--workdir={workdir}"]
  proc = helpers.run_cli(args, module="medfm_jax.evaluate", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["protocol"] == "knn" and results["k"] == 5 and results["metrics"]["num_examples"] == 64
  # The config that produced the numbers travels with them.
  assert results["config"]["knn"]["k"] == 5 and results["config"]["init_from"] == mae_ckpt
  assert os.path.isfile(os.path.join(workdir, "results.md"))


def test_linear_probe_label_budget(monkeypatch):
  # probe.labels_per_class: the probe fits on exactly that many rows per class, drawn with
  # probe.seed from the feature pool (raw pixels here: no encoder to compile).
  c = _config("linear_probe", **{"features.input": "pixels", "probe.labels_per_class": 3,
                                 "probe.epochs": 2})
  fitted = []
  real = probe.linear_probe
  monkeypatch.setattr(probe, "linear_probe", lambda x, y, *a: fitted.append((x, y)) or real(x, y, *a))
  mesh = helpers.single_device_mesh(c)
  out = protocols.linear_probe_labels(c, mesh, ("modality",))
  assert np.bincount(fitted[0][1]).tolist() == [3, 3, 3, 3] and 0 <= out["modality"]["accuracy"] <= 1
  c.probe.seed = 1
  protocols.linear_probe_labels(c, mesh, ("modality",))
  assert fitted[1][0].shape == fitted[0][0].shape and not np.array_equal(fitted[1][0], fitted[0][0])
  c.probe.labels_per_class = 200     # 256 pool rows over 4 modalities
  with pytest.raises(ValueError, match=r"^probe.labels_per_class=200: class \d has \d+ examples"):
    protocols.linear_probe_labels(c, mesh, ("modality",))
  c.probe.labels_per_class = -1
  with pytest.raises(config_lib.ConfigError, match=r"^probe.labels_per_class=-1: must be >= 0"):
    protocols.check_config(c)


def test_finetune_refuses_augmentations_that_change_a_location_or_size_label():
  # A horizontal flip moves the lesion to the other side and a random crop can move it to another
  # quadrant, while the label stays: fine-tuning on lesion_location needs both off.
  still = {"data.label": "lesion_location", "data.flip": False, "data.crop_scale": (1.0, 1.0),
           "data.crop_ratio": (1.0, 1.0)}
  _config("finetune", "full", **still)
  for field, value in (("data.flip", True), ("data.crop_scale", (0.5, 1.0)), ("data.crop_ratio", (0.75, 1.33))):
    with pytest.raises(config_lib.ConfigError, match=field.split(".")[1]) as e:
      _config("finetune", "full", **{**still, field: value})
    assert "\n" not in str(e.value)
  _config("linear_probe", **{**still, "data.flip": True})   # frozen features: no train-time flip
  _config("finetune", "full", **{"data.label": "modality"})   # labels a flip keeps
  # The size class is the lesion's area fraction: a crop resized to the full image enlarges it; a flip does not.
  _config("finetune", "full", **{**still, "data.label": "lesion_size", "data.flip": True})
  for field, value in (("data.crop_scale", (0.5, 1.0)), ("data.crop_ratio", (0.75, 1.33))):
    with pytest.raises(config_lib.ConfigError, match="lesion_size.*" + field.split(".")[1]):
      _config("finetune", "full", **{**still, "data.label": "lesion_size", field: value})
  for variant in ("full_spatial", "lora_spatial"):   # the recipes made for such labels pass as they are
    c = _config("finetune", variant, **{"data.label": "lesion_location"})
    assert (c.objective.pool, c.objective.layer_decay) == ("mean", 0.0)


class _StopTraining(Exception):
  pass


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_finetune_label_budget(variant, monkeypatch):
  # probe.labels_per_class: fine-tuning trains on exactly K rows per class of the probe's pool (the
  # first features.train_examples train records), drawn with probe.seed. loop.train is replaced by
  # a stub that records the source it would train on (nothing is compiled).
  c = _config("finetune", variant, **{"data.label": "modality", "probe.labels_per_class": 3})
  sources = []

  def fake_train(config, workdir, mesh, source=None):
    sources.append(source)
    raise _StopTraining
  monkeypatch.setattr(loop, "train", fake_train)
  mesh = helpers.single_device_mesh(c)
  for seed in (0, 1):
    c.probe.seed = seed
    with pytest.raises(_StopTraining):
      protocols.run(c, "/tmp/unused", mesh)
  a, b = sources
  assert len(a) == 12 and np.bincount([a[i]["modality"] for i in range(len(a))]).tolist() == [3] * 4
  assert max(a.indices) < c.features.train_examples and a.indices != b.indices
  # The probe, given the same pool labels and seed, draws the same rows.
  pool = pipeline.make_source(c.data, c.data.train_split, c.features.train_examples)
  labels = np.array([pool[i]["modality"] for i in range(len(pool))])
  c.probe.seed = 0
  assert a.indices == tuple(protocols.budget_rows(c, labels, 4))
  c.probe.labels_per_class = 200     # 256 pool rows over 4 modalities
  with pytest.raises(ValueError, match=r"^probe.labels_per_class=200: class \d has \d+ examples"):
    protocols.run(c, "/tmp/unused", mesh)


def test_eval_cli_adopts_the_checkpoint_image_geometry(tmp_path, monkeypatch):
  # A 64-px, 3-channel run is evaluated at its size, channels and normalisation, not at the eval
  # config's 32 px (it was silently before), unless the command line sets the field: in the
  # variant string or as a --config.* flag.
  run = helpers.tiny_mae_config(**{"data.image_size": 64, "data.channels": 3, "data.mean": (0.4,),
                                   "data.std": (0.2,)})
  saved = json.loads(run.to_json_best_effort())       # as read_meta decodes it: tuples are lists
  monkeypatch.setattr(restore, "checkpoint_objective", lambda path: ("mae", saved))

  def cli_data(arg, *args):
    argv = ["evaluate", f"--config={helpers.REPO}/configs/eval/{arg}", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    protocols.adopt_checkpoint(fv.config, config_lib.explicit_keys(fv["config"]))
    return fv.config.data

  init = f"--config.init_from={tmp_path}"
  d = cli_data("linear_probe.py:tiny", init)
  assert (d.image_size, d.channels, d.mean, d.std) == (64, 3, (0.4,), (0.2,))
  d = cli_data("seg_probe.py:tiny,data.image_size=32", init, "--config.data.channels=1")
  assert (d.image_size, d.channels, d.mean) == (32, 1, (0.4,))
  d = cli_data("linear_probe.py:tiny")                 # random init: the eval config's
  assert (d.image_size, d.channels) == (32, 1)


def test_eval_config_errors_name_the_field():
  c = helpers.tiny_eval_config("knn", **{"knn.k": 0})
  with pytest.raises(config_lib.ConfigError, match=r"^knn.k=0, knn.temperature=0.07: must be > 0$"):
    protocols.check_config(c)
  c = helpers.tiny_eval_config("finetune", "full", **{"objective.scheme": "prompt"})
  with pytest.raises(config_lib.ConfigError, match="objective.scheme='prompt' needs model.num_prompts > 0"):
    config_lib.validate(c)


@pytest.mark.slow
def test_encoder_weights_must_name_a_tower_of_the_checkpoint(mae_ckpt):
  c = helpers.tiny_eval_config("knn", init_from=mae_ckpt, encoder_weights="teacher")
  restore.adopt_architecture(c)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"encoder_weights='teacher': objective 'mae' checkpoints have \['encoder'\]"):
    protocols.check_config(c)


@pytest.mark.slow
def test_embedding_export(mae_ckpt, tmp_path):
  c = _config("linear_probe", init_from=mae_ckpt)
  path = embed.export(c, str(tmp_path), "test", 40)
  out = np.load(path)
  assert out["features"].shape == (40, 96) and out["features"].dtype == np.float32
  np.testing.assert_array_equal(out["ids"], np.arange(40))
  source = pipeline.make_source(c.data, "test")
  np.testing.assert_array_equal(out["finding"], [source[i]["finding"] for i in range(40)])
  np.testing.assert_array_equal(out["modality"], [source[i]["modality"] for i in range(40)])


@pytest.mark.slow
def test_benchmark_probes_and_closing_table(mae_ckpt, tmp_path):
  # The seg probe's tokens, upsampling and masks line up: the body mask (63 % of the test pixels at
  # 16 px) is linearly segmentable from the 4-step checkpoint's patch tokens, above the all-body
  # prediction (Dice 2f / (1 + f) = 0.77): measured Dice 0.89, mIoU 0.77 (2026-11-30).
  seg = protocols.run(_config("seg_probe", init_from=mae_ckpt, **{"seg_probe.mask": "body"}), "")
  m = seg["metrics"]
  everything = 2 * m["foreground_fraction"] / (1 + m["foreground_fraction"])
  assert m["dice"] > everything + 0.05, (m, everything)
  assert m["miou"] > 0.7
  # Raw pixels go through the same probe code: modality is linear in them, lesion location is not.
  c = _config("linear_probe", **{"features.input": "pixels"})
  pix = protocols.linear_probe_labels(c, helpers.single_device_mesh(c), ("modality", "lesion_location"))
  assert pix["modality"]["accuracy"] > 0.9
  assert pix["lesion_location"]["accuracy"] < pix["lesion_location"]["chance"] + 0.2
  # The training job's closing table: both rows, every label, written next to the run.
  train_config = ml_collections.ConfigDict(restore.checkpoint_objective(mae_ckpt)[1])
  result = closing.compare(_config("linear_probe"), train_config, mae_ckpt, ("modality", "finding"))
  assert set(result["rows"]) == {"pretrained", "random init"}
  assert all(set(r) == {"modality", "finding"} for r in result["rows"].values())
  assert result["rows"]["pretrained"] != result["rows"]["random init"]
  text = closing.write(str(tmp_path), result)
  assert "| modality | accuracy |" in text and json.load(open(tmp_path / "final_eval.json"))["rows"]
  with pytest.raises(protocols.EvalError, match="final_eval.labels: data.label='nope'"):
    closing.check(_config("linear_probe"), ("nope",))
  with pytest.raises(protocols.EvalError, match="protocol 'knn'"):
    closing.check(_config("knn"), ("finding",))
