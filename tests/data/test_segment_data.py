"""Phantom masks, SAM prompts made in the input pipeline (data.segment)."""
import numpy as np
import pytest

from medfm_jax.data import phantoms, pipeline, prompts
from medfm_jax.data import spec as spec_lib


def test_masks_are_where_the_lesions_are():
  for modality in range(len(phantoms.MODALITIES)):
    seed = (0, 0, modality)
    plain, _ = phantoms.render_phantom(modality, 0, seed, 64, 1)
    img, _, m = phantoms.render_phantom(modality, 1, seed, 64, 1, with_masks=True)
    _, _, none = phantoms.render_phantom(modality, 0, seed, 64, 1, with_masks=True)
    assert m["masks"].shape == (64, 64, len(phantoms.MASK_CLASSES)) and m["masks"].dtype == np.uint8
    lesion = m["masks"][..., 0] > 0
    assert lesion.sum() > 10 and not none["masks"][..., 0].any() and not none["lesion_ids"].any()
    # Same seed: same anatomy and noise, so the lesion changes the pixels inside its mask only.
    diff = np.abs(img.astype(np.float32) - plain.astype(np.float32))[..., 0]
    assert diff[lesion].mean() > 10 * (diff[~lesion].mean() + 0.1), phantoms.MODALITIES[modality]
    for k in (1, 2):   # body and organ are present, the organ inside the image
      assert 0 < m["masks"][..., k].mean() < 1, (phantoms.MODALITIES[modality], phantoms.MASK_CLASSES[k])


def test_multiple_lesions_are_instances():
  _, _, m = phantoms.render_phantom(0, phantoms.FINDINGS.index("multiple_lesions"), (0, 0, 3), 96, 1,
                                    with_masks=True)
  ids = set(np.unique(m["lesion_ids"])) - {0}
  assert len(ids) >= 3 and ((m["lesion_ids"] > 0) == (m["masks"][..., 0] > 0)).all()


def test_box_and_points():
  mask = np.zeros((40, 50), np.uint8)
  mask[10:20, 5:15] = 1
  rng = np.random.default_rng(0)
  boxes = np.stack([prompts.box_from_mask(mask, rng, 3) for _ in range(200)])
  np.testing.assert_array_equal(boxes.min(0), [2, 7, 14, 19])     # pushed out by 0..3 px
  np.testing.assert_array_equal(boxes.max(0), [5, 10, 17, 22])
  pts, labels = prompts.sample_points(mask, rng, 30, 20)
  xy = pts.astype(int)
  assert (mask[xy[:, 1], xy[:, 0]] == (labels == 1)).all() and labels.tolist() == [1] * 30 + [0] * 20
  with pytest.raises(ValueError, match="data.segment.classes"):
    prompts.PromptSpec.from_config({"classes": ("tumour",)})
  with pytest.raises(ValueError, match="unknown fields"):
    prompts.PromptSpec.from_config({"points": 2})


def test_pipeline_batches_carry_targets_and_prompts():
  data = dict(source="phantoms", image_size=32, channels=1, flip=True,
              segment=dict(classes=("lesion", "organ"), num_points=2, num_neg_points=1))
  spec = spec_lib.resolve(data)
  batch = next(pipeline.make_train_iterator(spec, 8, seed=0))
  abstract = spec.abstract_batch(8)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (v.shape, v.dtype) for k, v in abstract.items()}
  for i in range(8):
    t = batch["target"][i]
    ys, xs = np.nonzero(t)
    x0, y0, x1, y1 = batch["box"][i]
    assert x0 <= xs.min() and xs.max() <= x1 and y0 <= ys.min() and ys.max() <= y1
    inside = t[batch["points"][i, :, 1].astype(int), batch["points"][i, :, 0].astype(int)]
    np.testing.assert_array_equal(inside, [1, 1, 0])
  evals = list(pipeline.make_eval_batches(spec, "val", 8, 10))
  assert len(evals) == 2 and not evals[1]["mask"][2:].any() and not evals[1]["target"][2:].any()


def test_manifest_mask_column(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rows = ["path,label,mask"]
  for i in range(4):
    img = np.full((40, 60), 30, np.uint8)
    ids = np.zeros((40, 60), np.uint8)
    ids[10:20, 25 + i:35 + i] = 1          # object 1 (bright in the image)
    ids[25:30, 40:50] = 2                  # object 2
    img[ids > 0] = 220
    Image.fromarray(img).save(tmp_path / f"im{i}.png")
    Image.fromarray(ids).save(tmp_path / f"m{i}.png")
    rows.append(f"im{i}.png,a,m{i}.png")
  (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
  data = dict(source="manifest", path=str(tmp_path / "data.csv"), image_size=32, channels=1, flip=False,
              splits="train:1.0", segment=dict(classes=("lesion",), jitter=0.0))
  batch = next(pipeline.make_train_iterator(spec_lib.resolve(data), 4, seed=0))
  for i in range(4):   # the target is one object, and the (resampled) image is bright there
    t, img = batch["target"][i] > 0, batch["image"][i, ..., 0]
    mid = (img.max() + img.min()) / 2
    assert t.sum() > 5 and (img[t] > mid).mean() > 0.8 and (img[~t] > mid).mean() < 0.2
    ys, xs = np.nonzero(t)
    np.testing.assert_array_equal(batch["box"][i], [xs.min(), ys.min(), xs.max(), ys.max()])
  with pytest.raises(ValueError, match="data.segment: masks come from"):
    pipeline.make_source(spec_lib.resolve({**data, "source": "folder"}), "train")
