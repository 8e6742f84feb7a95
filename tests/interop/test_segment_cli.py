"""python -m medfm_jax.segment: a folder + CSV of prompts -> PNG masks and predicted IoU."""
import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from medfm_jax import segment
from medfm_jax.interop import sam as sam_io
from medfm_jax.models import sam as sam_lib
from medfm_jax.parallel import programs

SIZES = dict(image_size=32, patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=32, window_size=2,
             global_attn_indexes=(1,), prompt_dim=16, decoder_heads=2, decoder_mlp_dim=32, iou_head_hidden_dim=16)


@pytest.mark.slow   # ~19 CPU-s: SAM compiles for every prompt row
def test_segment_folder(tmp_path):
  model = sam_lib.build_sam(SIZES)
  params = programs.jit_once(lambda x: model.init(jax.random.key(0), x))(jnp.zeros((1, 32, 32, 3)))["params"]
  weights = sam_io.export(params, sam_lib.full_config(SIZES), tmp_path / "w", format="segment_anything")
  (tmp_path / "img").mkdir()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 20, 3), np.uint8)).save(tmp_path / "img" / "a.png")
  (tmp_path / "p.csv").write_text('image,box,points\na.png,"2 3 15 30",\na.png,,"5 6 1"\n')
  seg = segment.Segmenter(weights)
  scores = segment.run(seg, str(tmp_path / "img"), str(tmp_path / "p.csv"), str(tmp_path / "out"))
  rows = list(csv.DictReader(open(scores)))
  assert [r["mask"] for r in rows] == ["a_0.png", "a_1.png"]
  for r in rows:
    assert np.asarray(Image.open(tmp_path / "out" / r["mask"])).shape == (40, 20)
  image = np.asarray(Image.open(tmp_path / "img" / "a.png"))
  mask, iou = seg(image, np.array([[2, 3], [15, 30]], np.float32), np.array([2, 3]))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "a_0.png")) > 0, mask)
  assert abs(float(rows[0]["predicted_iou"]) - iou) < 1e-5
  with pytest.raises(ValueError, match="row 1: give exactly one of"):
    segment.parse_prompt({"box": "1 2 3 4", "points": "1 2 1"}, "p.csv: row 1")
  with pytest.raises(ValueError, match="cannot parse"):
    segment.parse_prompt({"points": "1 2 7"}, "p.csv: row 1")
