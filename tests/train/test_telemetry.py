import json
import os

import jax
import jax.numpy as jnp
import pytest

from medfm_jax.train import telemetry


def test_progress_excludes_eval_time_and_gives_eta():
  now = [100.0]                                    # a fake clock: exact, whatever the load
  progress = telemetry.Progress(start_step=0, total_steps=100, clock=lambda: now[0])
  now[0] += 0.5
  progress.exclude(0.25)
  out = progress.report(10)
  assert out["step_time_s"] == pytest.approx((0.5 - 0.25) / 10)
  assert out["eta_s"] == pytest.approx(90 * out["step_time_s"])
  # The next report times steps 10..40 only, without the exclusion already used.
  now[0] += 0.75
  out = progress.report(40)
  assert out["step_time_s"] == pytest.approx(0.75 / 30)
  assert out["eta_s"] == pytest.approx(60 * 0.75 / 30)
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
