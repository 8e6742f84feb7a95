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


def test_step_flops_counts_the_global_program_and_peak_override():
  """FLOPs of the whole (all-device) program: a matmul sharded over 8 devices counts once."""
  a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
  expected = 2 * 64 * 32 * 16
  assert telemetry.step_flops(jax.jit(lambda a, b: a @ b).lower(a, b)) == pytest.approx(expected, rel=0.1)
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  sharded = jax.jit(lambda a, b: a @ b, in_shardings=(rows, None)).lower(a, b)
  assert telemetry.step_flops(sharded) == pytest.approx(expected, rel=0.1)


def test_step_flops_falls_back_to_the_cpu_client_where_lowered_analysis_is_missing():
  """JAX's CUDA plugin raises NotImplementedError for Lowered.cost_analysis (seen on an H200,
  JAX 0.11.2): the same HLO is then analysed by the CPU client."""
  lowered = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16)))
  class PluginLowered:   # what the CUDA plugin's Lowered does
    _lowering = lowered._lowering   # pylint: disable=protected-access
    def cost_analysis(self):
      raise NotImplementedError("Lowered.cost_analysis not implemented on platform 'cuda'")
  assert telemetry.step_flops(PluginLowered()) == pytest.approx(2 * 64 * 32 * 16, rel=0.1)
  assert telemetry.peak_tflops_per_device(123.0) == 123.0
  assert telemetry.peak_tflops_per_device() > 0


def test_flop_counting_config_unrolls_every_loop_the_cost_analysis_counts_once():
  from configs import mae as mae_config, sam as sam_config   # pylint: disable=import-outside-toplevel
  plain = mae_config.get_config("tiny")
  assert telemetry.flop_counting_config(plain) is None            # nothing to unroll: its own step
  looped = mae_config.get_config("tiny,model.scan=True,grad_accum_steps=2,model.remat=full")
  hardware = telemetry.flop_counting_config(looped)
  assert (hardware.model.scan, hardware.grad_accum_steps, hardware.model.remat) == (False, 1, "full")
  model = telemetry.flop_counting_config(looped, model_flops=True)
  assert (model.model.remat, model.model.attention_impl) == ("none", "xla")
  assert looped.model.scan and looped.grad_accum_steps == 2       # the caller's config is untouched
  sam = sam_config.get_config("tiny,objective.encoder='vitdet',model.attention_chunk=512")
  assert telemetry.flop_counting_config(sam).model.attention_chunk == 0
  assert "attention_impl" not in telemetry.flop_counting_config(sam, model_flops=True).model


def test_flop_counting_config_counts_the_tpu_flash_kernel_as_xla_attention():
  """XLA's cost analysis does not see into a Pallas kernel: compiling for TPU ('auto' = the
  kernel), the FLOPs come from the same step with XLA's attention; SAM's config has no field."""
  from configs import mae as mae_config, sam as sam_config   # pylint: disable=import-outside-toplevel
  from medfm_jax.models import tpu_attention  # pylint: disable=import-outside-toplevel
  plain, sam = mae_config.get_config("tiny"), sam_config.get_config("tiny")
  with tpu_attention.target_platform("tpu"):
    assert telemetry.flop_counting_config(plain).model.attention_impl == "xla"
    assert telemetry.flop_counting_config(sam).model.attention_impl == "xla"
    assert telemetry.flop_counting_config(mae_config.get_config("tiny,model.attention_impl=xla")) is None
  assert plain.model.attention_impl == "auto" and "attention_impl" not in sam.model
  assert telemetry.flop_counting_config(plain) is None              # on CPU: XLA's attention already
