"""AOT planning on fake devices: per-device bytes, FLOPs, collectives (nothing executed)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from medfm_jax import plan
from tests import helpers

# helpers.tiny_mae_config's model (the in-process plan below) on the command line.
_TINY = ["--config=configs/mae.py:tiny", "--config.data.image_size=16", "--config.batch_size=16",
         "--config.model.depth=2", "--config.model.decoder_width=32", "--config.model.decoder_depth=1"]


@pytest.mark.slow
def test_fsdp_splits_state_8_ways_and_keeps_flops(tmp_path):
  out = tmp_path / "plan.jsonl"
  cli = subprocess.run([sys.executable, "-m", "medfm_jax.plan", *_TINY, "--devices=8",
                        "--config.mesh.data=1", "--config.mesh.fsdp=-1", f"--json={out}"],
                       cwd=helpers.REPO, capture_output=True, text=True, timeout=300,
                       env=helpers.subprocess_env())
  assert cli.returncode == 0, cli.stderr[-3000:]
  assert "| Mu/4 | 1×8×1 | 16 |" in cli.stdout           # the Markdown row
  fsdp = json.loads(out.read_text())
  assert fsdp["devices"] == 8 and fsdp["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}

  dp = plan.plan(helpers.tiny_mae_config(**{"mesh.data": 8}))     # in-process: conftest's 8 devices
  ratio = fsdp["params_gib"] / dp["params_gib"]
  assert 1 / 8 <= ratio < 1 / 7, ratio           # replicated: biases/norms too small to split
  assert fsdp["opt_state_gib"] / dp["opt_state_gib"] < 1 / 7
  np.testing.assert_allclose(fsdp["tflop_per_step"], dp["tflop_per_step"], rtol=1e-6)
  accum = plan.plan(helpers.tiny_mae_config(**{"mesh.data": 8, "grad_accum_steps": 2}))
  np.testing.assert_allclose(accum["tflop_per_step"], dp["tflop_per_step"], rtol=1e-6)  # both microbatches
  for r in (fsdp, dp):   # state + batch = the compiled program's (donated) arguments
    np.testing.assert_allclose(r["params_gib"] + r["opt_state_gib"] + r["other_state_gib"]
                               + r["batch_gib"], r["argument_gib"], rtol=0, atol=2 ** -20)  # 1 KiB
    assert r["temp_gib"] > 0 and r["total_gib"] > r["argument_gib"] and r["fits"]
  # data parallel all-reduces the full gradients; fsdp gathers/scatters 1/8 shards
  assert dp["collective_gib_per_device"] > 1.5 * dp["params_gib"]


_HLO = """\
%body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = f32[16,4]{1,0} all-gather(f32[4,4]{1,0} %x), replica_groups=[2,4]<=[8], dimensions={0}
}

%cond.1 (p: (s32[], f32[8])) -> pred[] {
  %c = pred[] constant(true)
}

ENTRY %main.2 (a: f32[8]) -> f32[8] {
  %ar = bf16[1024]{0} all-reduce(bf16[1024]{0} %g), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %rs = f32[2]{0} reduce-scatter(f32[16]{0} %h), replica_groups=[1,8]<=[8], dimensions={0}
  %w = (s32[], f32[8]) while(%t), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"5"}}
}
"""


def test_collective_bytes_weight_loop_bodies_by_trip_count():
  assert plan.computation_multipliers(_HLO) == {"body.1": 5, "cond.1": 1, "main.2": 1, "add": 1}
  expected = (5 * 16 * 4 * 4 * 3 / 4          # all-gather in a 5-trip loop, groups of 4
              + 2 * 1024 * 2 * 1 / 2          # all-reduce of bf16[1024], pairs
              + 2 * 4 * 7)                    # reduce-scatter to f32[2] over 8
  assert plan.collective_bytes(_HLO, 8) == pytest.approx(expected)


def test_chip_table_and_markdown():
  assert plan.chip_spec("v5p") == {"peak_tflops": 459.0, "hbm_gib": 95, "hbm_gbs": 2765, "link_gbs": 600}
  assert plan.chip_spec("H100")["peak_tflops"] == 989.0
  with pytest.raises(ValueError, match=r"--chip='v9': allowed \['a100', 'h100'"):
    plan.chip_spec("v9")
