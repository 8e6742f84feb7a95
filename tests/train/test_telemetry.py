import json
import os
import time

import jax
import jax.numpy as jnp

from medfm_jax.train import telemetry


def test_progress_excludes_eval_time_and_gives_eta():
  progress = telemetry.Progress(start_step=0, total_steps=100)
  time.sleep(0.05)
  progress.exclude(0.04)
  out = progress.report(10)
  assert 0.0005 < out["step_time_s"] < 0.004       # (>=0.05 s - 0.04 s) / 10 steps
  assert abs(out["eta_s"] - 90 * out["step_time_s"]) < 1e-9
  assert telemetry.format_eta(3725) == "1:02:05"


def test_writer_jsonl_and_tensorboard(tmp_path):
  writer = telemetry.MetricWriter(str(tmp_path))
  writer.write(5, {"loss": 1.5, "lr": jnp.float32(0.1)})
  writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    row = json.loads(f.readline())
  assert row["step"] == 5 and row["loss"] == 1.5 and abs(row["lr"] - 0.1) < 1e-7
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tensorboard"))


def test_compiled_flops_from_cost_analysis_and_peak_override():
  compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
  flops = telemetry.compiled_flops(compiled) / jax.device_count()
  assert abs(flops - 2 * 64 * 32 * 16) / (2 * 64 * 32 * 16) < 0.1
  assert telemetry.peak_tflops_per_device(123.0) == 123.0
  assert telemetry.peak_tflops_per_device() > 0
