"""The GPU benchmark suite's ``--smoke`` mode on CPU: every case runs at tiny size through the
command a user types, so the suite cannot rot between GPU sessions."""
import json
import math
import os

import pytest

from medfm_jax import bench_suite
from medfm_jax import config as config_lib
from tests import helpers


@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_case(tmp_path):
  out = tmp_path / "bench"
  proc = helpers.run_cli(["--suite=gpu", "--smoke", f"--out={out}", "--steps=1", "--warmup=0"],
                         module="medfm_jax.bench", timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in (out / bench_suite.JSONL).read_text().splitlines()]
  assert records[0]["case"] == "machine" and records[0]["backend"] == "cpu"
  by_case = {r["case"]: r for r in records[1:]}
  assert list(by_case) == list(bench_suite.CASE_NAMES)
  gpu_only = {c.name for c in bench_suite.CASES if c.needs_gpu}
  failed = {n: r.get("reason") for n, r in by_case.items() if r["status"] != "ok" and n not in gpu_only}
  assert not failed, failed
  for case in bench_suite.CASES:
    r = by_case[case.name]
    if case.needs_gpu:     # recorded, not run; its config must still load and pass its checks
      assert r == {"case": case.name, "status": "skipped", "reason": "needs a GPU"}
      config = bench_suite.load_config(case.config)
      config_lib.validate(config)
    elif case.kind == "jax":
      assert r["step_time_median_s"] > 0 and r["gflop_per_image"] > 0 and math.isfinite(r["loss"])
      assert r["batch_size"] == case.smoke[1][0] and r["program_memory_gib"] > 0
      assert r["xla_flags"] == case.xla_flags
    elif case.kind == "torch":
      assert r["batch_size"] == by_case["mae_b16"]["batch_size"] and r["images_per_s"] > 0
      assert r["jax_mae_b16_over_torch_images_per_s"] > 0
      assert r["compile_backend"] == ("aot_eager" if case.torch_compile else None)
    else:
      assert r["phantoms_over_consumption"] > 0 and r["folder_over_consumption"] > 0
  full, plain = by_case["mae_b16_remat_full"], by_case["mae_b16"]
  assert full["remat"] == "full" and full["gflop_per_image"] == pytest.approx(plain["gflop_per_image"])
  assert full["hardware_gflop_per_image"] > 1.1 * full["gflop_per_image"]   # recomputation counted apart
  table = (out / bench_suite.TABLE).read_text().splitlines()
  assert table[0].startswith("Device: cpu")
  assert [row.split("|")[1].strip() for row in table[4:]] == list(bench_suite.CASE_NAMES)


def test_gpu_suite_rejects_unknown_cases(tmp_path):
  with pytest.raises(ValueError, match="--cases: unknown nope; allowed mae_b16"):
    bench_suite.run_suite(tmp_path, smoke=True, cases=["nope"])
  assert not os.listdir(tmp_path) or not (tmp_path / bench_suite.JSONL).read_text()
