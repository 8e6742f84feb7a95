r"""The GPU benchmark suite: one command, one JSON-lines file, one Markdown table.

  python -m medfm_jax.bench --suite=gpu --out=DIR [--smoke] [--cases=NAME,...] [--deadline_s=S]

Runs, in this order (``CASES``), and appends one record per case to ``DIR/bench_gpu.jsonl`` as
soon as it finishes (a run cut short keeps what it measured), then writes ``DIR/bench_gpu.md``:

  mae_b16                MAE ViT-B/16, 224 px, bf16, attention 'auto' (cuDNN flash on GPU), at the
                         largest of the candidate batches whose compiled program fits the GPU
  mae_b16_xla            the same with XLA's own attention
  torch_mae_eager        HF ``ViTMAEForPreTraining``, bf16 autocast, SDPA, eager, mae_b16's batch
  torch_mae_compile      the same under ``torch.compile`` (inductor)
  loader_224             the MAE config's grain train iterator at 224 px (phantoms, PNG folder) with
                         one worker per core, against mae_b16's consumption in images/s
  mae_b16_remat_dots     mae_b16 with ``model.remat='dots'``
  mae_b16_remat_full     mae_b16 with ``model.remat='full'``
  mae_b16_lhs            mae_b16 with XLA's latency-hiding scheduler (own process: XLA_FLAGS)
  mae_b16_no_triton_gemm mae_b16 with Triton GEMM fusion off (own process)
  clip_b16               CLIP B/16 image and text towers, bf16
  dinov2_l14             DINOv2 ViT-L/14, 2 x 224 + 8 x 98 crops, iBOT + KoLeo, bf16
  medsam_b_1024          MedSAM's step (SAM ViT-B image encoder at 1024 px, box prompts, Dice + BCE),
                         bf16, global attention 1024 queries at a time; GPU only (its CPU step at
                         batch 1 is in docs/segmentation.md: a tiny SAM step compiles too slowly
                         for the smoke test's budget)
  primus_m_mae3d         the 3D MAE at Primus-M size (160^3 volumes, 8^3 patches: 8,000 tokens, the
                         decoder on all of them), bf16, full remat, attention 'auto' (cuDNN flash);
                         images/s are volumes/s
  primus_m_mae3d_xla     the same with XLA's attention (the memory the fused path saves)

Each JAX record: the batch, compile time, median step time, images/s, TFLOP/s (model FLOPs: XLA's
cost analysis of the lowered step without remat and with XLA attention, ``telemetry.step_flops``), MFU against the device table's dense bf16 peak (H100/H200 SXM 989,
A100 312; ``telemetry.PEAK_TFLOPS``), and memory: the compiled program's (arguments + temporaries
+ outputs - aliased) and the process's high-water mark where the backend reports it. Torch
records carry the MFU at the FLOPs per image that XLA counts for mae_b16 and the ratio of
mae_b16's images/s to theirs. The first record describes the machine (device, driver, versions).

``--smoke`` runs every case at tiny size on whatever backend there is (a CPU test runs it, so the
suite cannot rot); cases that need a GPU (cuDNN attention) are recorded as skipped with the reason.
The own-process cases then share one child process that has all their flags: the smoke run checks
their code path, not their flags' effect.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from medfm_jax import bench_torch
from medfm_jax.data import image_files, pipeline
from medfm_jax.models import vit
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.sweeps import spec as sweep_spec
from medfm_jax.train import assemble, telemetry

JSONL, TABLE = "bench_gpu.jsonl", "bench_gpu.md"
_CONFIGS = epath.Path(__file__).parent.parent / "configs"
_LHS = "--xla_gpu_enable_latency_hiding_scheduler=true"
_NO_TRITON_GEMM = "--xla_gpu_enable_triton_gemm=false"
_MAE_SMOKE = ("mae.py:tiny,data.image_size=16,model.depth=1,model.decoder_depth=1", (8,))


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark: ``kind`` 'jax' (a config's train step), 'torch' or 'loader'."""
  name: str
  kind: str
  config: str = ""                 # configs/ file and variant with overrides, "mae.py:vit_b16,k=v"
  batches: tuple[int, ...] = ()    # candidates, largest first: the first that fits is timed
  smoke: tuple[str, tuple[int, ...]] = _MAE_SMOKE
  xla_flags: str = ""              # set: runs in its own process with these XLA_FLAGS appended
  needs_gpu: bool = False
  torch_compile: bool = False


_MAE = "mae.py:vit_b16,dtype=bfloat16"
_PRIMUS = "mae3d.py:primus_m"          # bf16, full remat, 160^3 volumes (8,000 tokens)
_PRIMUS_SMOKE = ("mae3d.py:tiny,model.depth=1,model.decoder_depth=1", (2,))
CASES = (
    Case("mae_b16", "jax", _MAE, (1024, 512, 256)),
    Case("mae_b16_xla", "jax", _MAE + ",model.attention_impl=xla", (1024, 512, 256),
         smoke=(_MAE_SMOKE[0] + ",model.attention_impl=xla", (8,))),
    Case("torch_mae_eager", "torch"),
    Case("torch_mae_compile", "torch", torch_compile=True),
    Case("loader_224", "loader", _MAE, (256,), smoke=(_MAE_SMOKE[0], (8,))),
    Case("mae_b16_remat_dots", "jax", _MAE + ",model.remat=dots", (1024, 512, 256),
         smoke=(_MAE_SMOKE[0] + ",model.remat=dots", (8,))),
    Case("mae_b16_remat_full", "jax", _MAE + ",model.remat=full", (1024, 512, 256),
         smoke=(_MAE_SMOKE[0] + ",model.remat=full", (8,))),
    Case("mae_b16_lhs", "jax", _MAE, (1024, 512, 256), xla_flags=_LHS),
    Case("mae_b16_no_triton_gemm", "jax", _MAE, (1024, 512, 256), xla_flags=_NO_TRITON_GEMM),
    Case("clip_b16", "jax", "clip.py:vit_b16,dtype=bfloat16", (1024, 512, 256),
         smoke=("clip.py:tiny,data.image_size=16,model.depth=1,model.text.depth=1", (8,))),
    Case("dinov2_l14", "jax", "dino.py:vit_l14,dtype=bfloat16", (256, 128, 64),
         smoke=("dino.py:tiny_v2,model.depth=1", (8,))),
    Case("medsam_b_1024", "jax", "sam.py:medsam_vit_b,dtype=bfloat16,model.attention_chunk=1024", (16, 4, 1),
         needs_gpu=True),
    Case("primus_m_mae3d", "jax", _PRIMUS, (16, 8, 4, 2), smoke=_PRIMUS_SMOKE),
    Case("primus_m_mae3d_xla", "jax", _PRIMUS + ",model.attention_impl=xla", (16, 8, 4, 2),
         smoke=(_PRIMUS_SMOKE[0] + ",model.attention_impl=xla", _PRIMUS_SMOKE[1])),
)
CASE_NAMES = tuple(c.name for c in CASES)
# In smoke mode the GPU-only attention is replaced by XLA's, so the case's code path still runs.
_SMOKE_XLA_ATTENTION = ",model.attention_impl=xla"


def machine_record() -> dict[str, Any]:
  """Backend, device kind and count, driver, peak TFLOP/s used for MFU, package versions."""
  def version(name):
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return None
  driver = None
  if jax.default_backend() == "gpu":
    try:
      driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      driver = None
  return {"case": "machine", "backend": jax.default_backend(),
          "device_kind": jax.local_devices()[0].device_kind, "devices": jax.device_count(),
          "driver": driver, "peak_tflops_per_device": telemetry.peak_tflops_per_device(),
          "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
          **{f"{n}_version": version(n) for n in ("jax", "jaxlib", "flax", "optax", "torch",
                                                   "transformers")}}


def load_config(spec: str):
  """The ConfigDict of ``"FILE.py:VARIANT,k=v"`` with FILE under the repository's ``configs/``."""
  return sweep_spec.load_config(str(_CONFIGS / spec))


def _sample_batch(config, batch_size: int) -> dict[str, np.ndarray]:
  """A global batch of ``batch_size`` real pipeline examples: a few drawn in-process, tiled."""
  data = config.data.copy_and_resolve_references()
  data.num_workers = 0
  draw = min(batch_size, 8)
  real = next(pipeline.make_train_iterator(data, draw, config.seed))
  reps = -(-batch_size // draw)
  return {k: np.concatenate([v] * reps)[:batch_size] for k, v in real.items()
          if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}


def _program_bytes(compiled) -> float:
  """Device bytes the compiled program needs: arguments + temporaries + outputs - aliased."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return float("nan")
  if m is None:
    return float("nan")
  return float(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
               - m.alias_size_in_bytes)


def _device_bytes_limit() -> float:
  stats = jax.local_devices()[0].memory_stats() or {}
  return float(stats.get("bytes_limit", float("inf")))


def _is_oom(error: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def time_train_step(config, batch_size: int, steps: int, warmup: int) -> dict[str, Any]:
  """Compiles and times ``config``'s train step at ``batch_size`` on all local devices; raises
  ``MemoryError`` when the compiled program does not fit the device."""
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  mesh = mesh_lib.make_mesh(config.mesh)
  assembly = assemble.assemble(config, mesh)
  local = _sample_batch(config, batch_size)
  t0 = time.perf_counter()
  lowered = assembly.lower()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  # Hardware FLOPs: the step as compiled, loops unrolled (XLA's cost analysis counts a loop body
  # once). MFU counts the model's FLOPs: no remat recomputation, and attention as XLA dots (a cuDNN
  # flash-attention custom call is invisible to XLA's cost analysis).
  flops = lambda c: telemetry.step_flops(lowered if c is None else assemble.assemble(c, mesh).lower())
  hardware_flops = flops(telemetry.flop_counting_config(config))
  model_config = telemetry.flop_counting_config(config, model_flops=True)
  model_flops = hardware_flops if model_config is None else flops(model_config)
  impl = config.model.get("attention_impl")   # None: a model without the field (SAM's ViTDet: JAX's default)
  program = _program_bytes(compiled)
  if program > _device_bytes_limit():
    raise MemoryError(f"program needs {program / 2**30:.1f} GiB")
  state = assembly.init_state()
  with mesh_lib.use_mesh(mesh):
    batch = mesh_lib.to_global_batch(local, mesh)
    times = []
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      state, out = compiled(state, batch, assembly.train_step.schedule)
      jax.block_until_ready(out["loss"])
      if i >= warmup:
        times.append(time.perf_counter() - t0)
  n_dev = jax.device_count()
  median = statistics.median(times)
  tflops = model_flops / median / n_dev / 1e12
  stats = jax.local_devices()[0].memory_stats() or {}
  del state, batch
  return {"batch_size": batch_size, "compile_s": compile_s, "step_time_median_s": median,
          "images_per_s": batch_size / median, "gflop_per_image": model_flops / batch_size / 1e9,
          "hardware_gflop_per_image": hardware_flops / batch_size / 1e9, "tflops_per_device": tflops,
          "mfu": tflops / telemetry.peak_tflops_per_device(config.peak_tflops_per_device),
          "program_memory_gib": program / 2**30,
          "process_peak_memory_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30,
          "attention_impl": vit.resolve_attention_impl(impl, config.dtype) if impl is not None else "default",
          "remat": config.model.get("remat", "none"), "loss": float(out["loss"])}


def _run_jax(case: Case, spec: str, batches, steps: int, warmup: int) -> dict[str, Any]:
  config = load_config(spec)
  tried = []
  for b in batches:
    try:
      return {"config": spec, "batches_tried": tried + [b], **time_train_step(config, b, steps, warmup)}
    except MemoryError as e:
      tried.append(b)
      last = f"{e}"
    except Exception as e:  # pylint: disable=broad-except  (an OOM at run time: try a smaller batch)
      if not _is_oom(e):
        raise
      tried.append(b)
      last = str(e).splitlines()[0][:200]
  raise MemoryError(f"{case.name}: no candidate batch fits ({tried}); last: {last}")


def _run_torch(case: Case, records: dict, smoke: bool, steps: int, warmup: int) -> dict[str, Any]:
  mae = records.get("mae_b16", {})
  config = load_config(case.smoke[0] if smoke else _MAE)
  batch = mae.get("batch_size") or (_MAE_SMOKE[1][0] if smoke else CASES[0].batches[-1])
  m, cuda = config.model, jax.default_backend() == "gpu"
  backend = ("inductor" if cuda else "aot_eager") if case.torch_compile else None
  r = bench_torch.torch_mae_train_step_time(
      vit.size_from_config(m), config.data.image_size, config.data.channels, batch,
      m.decoder_width, m.decoder_depth, m.decoder_heads, steps=steps, warmup=warmup,
      device="cuda" if cuda else "cpu", bf16=True, attention="sdpa", compile_backend=backend)
  out = {"batch_size": batch, "torch_device": "cuda" if cuda else "cpu", "compile_backend": backend, **r}
  if mae.get("gflop_per_image"):
    tflops = r["images_per_s"] * mae["gflop_per_image"] / 1e3
    out.update(tflops_per_device=tflops, mfu=tflops / telemetry.peak_tflops_per_device(),
               jax_mae_b16_over_torch_images_per_s=mae["images_per_s"] / r["images_per_s"])
  return out


def _run_loader(case: Case, spec: str, batches, records: dict, smoke: bool) -> dict[str, Any]:
  config = load_config(spec)
  images, num_batches = (32, 3) if smoke else (256, 20)   # smoke: the code path, not a measurement
  workers = min(16, os.cpu_count() or 1)
  rows = {}
  with tempfile.TemporaryDirectory() as root:
    png = os.path.join(root, "png")
    image_files.export_phantoms(png, images, config.data.image_size, "png")
    for source, extra in (("phantoms", {}), ("folder", {"path": png, "splits": "train:1"})):
      data = config.data.copy_and_resolve_references()
      data.update(source=source, num_workers=workers, **extra)
      rows[source] = pipeline.time_train_iterator(data, batches[0], num_batches=num_batches)["images_per_s"]
  consumed = records.get("mae_b16", {}).get("images_per_s")
  out = {"config": spec, "batch_size": batches[0], "workers": workers,
         "image_size": config.data.image_size, "consumed_images_per_s": consumed}
  for source, ips in rows.items():
    out[f"{source}_images_per_s"] = ips
    if consumed:
      out[f"{source}_over_consumption"] = ips / consumed
  return out


def run_case(case: Case, records: dict, smoke: bool, steps: int, warmup: int) -> dict[str, Any]:
  """Runs one case in this process; returns its record (status 'ok', 'skipped' or 'failed')."""
  spec, batches = case.smoke if smoke else (case.config, case.batches)
  gpu = jax.default_backend() == "gpu"
  if case.needs_gpu and not gpu:
    return {"case": case.name, "status": "skipped", "reason": "needs a GPU"}
  if smoke and not gpu and case.kind == "jax" and "attention_impl=" not in spec:
    spec += _SMOKE_XLA_ATTENTION
  t0 = time.perf_counter()
  try:
    if case.kind == "jax":
      body = _run_jax(case, spec, batches, steps, warmup)
    elif case.kind == "torch":
      body = _run_torch(case, records, smoke, steps, warmup)
    else:
      body = _run_loader(case, spec, batches, records, smoke)
    status = {"status": "ok"}
  except Exception as e:  # pylint: disable=broad-except  (one case's failure must not end the suite)
    body, status = {}, {"status": "failed", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
  return {"case": case.name, **status, "xla_flags": case.xla_flags, "wall_s": time.perf_counter() - t0, **body}


def _run_in_subprocess(cases: list[Case], out: epath.Path, smoke: bool, steps: int, warmup: int,
                       timeout_s: float) -> dict[str, dict[str, Any]]:
  """Runs ``cases`` in one fresh process with their XLA_FLAGS (read once, at backend start);
  returns their records by name."""
  flags = " ".join(c.xla_flags for c in cases)
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
  env["PYTHONPATH"] = os.pathsep.join([str(_CONFIGS.parent), env.get("PYTHONPATH", "")])
  cmd = [sys.executable, "-m", "medfm_jax.bench", "--suite=gpu", f"--out={out}",
         f"--cases={','.join(c.name for c in cases)}", f"--steps={steps}", f"--warmup={warmup}",
         "--suite_child"] + (["--smoke"] if smoke else [])
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(timeout_s, 1) if np.isfinite(timeout_s) else None)
  except subprocess.TimeoutExpired:
    return {c.name: {"case": c.name, "status": "failed", "reason": f"timed out after {timeout_s:.0f} s",
                     "xla_flags": c.xla_flags} for c in cases}
  records = read_records(out)
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
  return {c.name: records[c.name] if c.name in records else
          {"case": c.name, "status": "failed", "reason": f"exit {proc.returncode}: {tail[0][:300]}",
           "xla_flags": c.xla_flags} for c in cases}


def read_records(out) -> dict[str, dict]:
  """The suite's records in ``out/bench_gpu.jsonl`` by case name (the last one of each name)."""
  path = epath.Path(out) / JSONL
  if not path.exists():
    return {}
  return {r["case"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def run_suite(out, smoke: bool = False, cases=None, steps: int = 10, warmup: int = 2,
              deadline_s: float = float("inf"), child: bool = False) -> dict[str, dict]:
  """Runs ``cases`` (default all, in ``CASES`` order) and writes ``out/bench_gpu.{jsonl,md}``.
  Cases that would start after ``deadline_s`` seconds are recorded as skipped."""
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  unknown = sorted(set(cases or ()) - set(CASE_NAMES))
  if unknown:
    raise ValueError(f"--cases: unknown {', '.join(unknown)}; allowed {', '.join(CASE_NAMES)}")
  selected = [c for c in CASES if not cases or c.name in cases]
  jsonl = str(out / JSONL)
  start = time.perf_counter()
  if not child:
    (out / JSONL).write_text("")
    telemetry.append_jsonl(jsonl, machine_record())
  records = read_records(out)
  done_in_child = {}
  for case in selected:
    elapsed = time.perf_counter() - start
    if case.name in done_in_child:
      record = done_in_child.pop(case.name)
    elif elapsed > deadline_s:
      record = {"case": case.name, "status": "skipped", "reason": f"deadline {deadline_s:.0f} s reached"}
    elif case.xla_flags and not child:
      # --smoke checks the code path, not the flags' effect: one child runs every own-process case
      # (one process start and one compile of the tiny step instead of one per case).
      group = [c for c in selected[selected.index(case):] if c.xla_flags] if smoke else [case]
      done_in_child = _run_in_subprocess(group, out, smoke, steps, warmup, deadline_s - elapsed)
      record = done_in_child.pop(case.name)
    else:
      record = run_case(case, records, smoke, steps, warmup)
    records[case.name] = record
    telemetry.append_jsonl(jsonl, record)
    print(json.dumps(record), flush=True)
  if not child:
    (out / TABLE).write_text(markdown_table(read_records(out)))
  return records


def _fmt(value, spec: str) -> str:
  return "" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)


def markdown_table(records: dict[str, dict]) -> str:
  """The suite's Markdown report: the machine line, then one row per case."""
  m = records.get("machine", {})
  lines = [f"Device: {m.get('device_kind')} x{m.get('devices')} ({m.get('backend')}), driver "
           f"{m.get('driver')}, peak {m.get('peak_tflops_per_device')} TFLOP/s per device; jax "
           f"{m.get('jax_version')}, jaxlib {m.get('jaxlib_version')}, flax {m.get('flax_version')}, "
           f"torch {m.get('torch_version')}, transformers {m.get('transformers_version')}, "
           f"{m.get('cpu_count')} CPUs.", "",
           "| case | status | batch | compile s | step ms | img/s | TFLOP/s | MFU | memory GiB | notes |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for name in CASE_NAMES:
    r = records.get(name)
    if r is None:
      continue
    notes = []
    if r.get("status") != "ok":
      notes.append(r.get("reason", ""))
    if r.get("attention_impl"):
      notes.append(f"attention {r['attention_impl']}, remat {r.get('remat')}")
    if r.get("xla_flags"):
      notes.append(r["xla_flags"])
    if r.get("jax_mae_b16_over_torch_images_per_s"):
      notes.append(f"mae_b16 / this: {r['jax_mae_b16_over_torch_images_per_s']:.2f}x; first step "
                   f"{r['first_step_s']:.1f} s")
    for source in ("phantoms", "folder"):
      if f"{source}_images_per_s" in r:
        ratio = r.get(f"{source}_over_consumption")
        notes.append(f"{source} {r[f'{source}_images_per_s']:,.0f} img/s"
                     + (f" = {ratio:.2f}x the step" if ratio else "") + f", {r['workers']} workers")
    step = r.get("step_time_median_s")
    memory = r.get("program_memory_gib", r.get("peak_memory_gib"))
    lines.append("| " + " | ".join([
        name, r.get("status", ""), _fmt(r.get("batch_size"), "d"), _fmt(r.get("compile_s"), ".1f"),
        _fmt(step * 1e3 if step else None, ".1f"), _fmt(r.get("images_per_s"), ",.0f"),
        _fmt(r.get("tflops_per_device"), ".1f"), _fmt(r.get("mfu"), ".1%"), _fmt(memory, ".2f"),
        "; ".join(n for n in notes if n)]) + " |")
  return "\n".join(lines) + "\n"
