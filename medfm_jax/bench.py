r"""Throughput benchmark of the jitted train step (not a test).

  python -m medfm_jax.bench --config=configs/mae.py:tiny
  python -m medfm_jax.bench --config=configs/mae.py:vit_b16,batch_size=8 --torch
  python -m medfm_jax.bench --config=configs/mae.py:tiny --data_only [--data_sources=phantoms,folder,dicom,tfds --data_workers=0,2]
  python -m medfm_jax.bench --suite=gpu --out=DIR [--smoke] [--cases=mae_b16,...] [--deadline_s=S]

Prints compile time, median step time, images/s (total and per device), TFLOP/s per device and
MFU for the config's model and global batch on one batch of real examples, tiled (data loading excluded; see
``--data_only`` for the input pipeline: phantom generation, the config's train iterator, and a
table of train-iterator images/s per source (phantoms, PNG folder, DICOM folder, TFDS
array_record built from the PNGs; files written to a temp dir) and worker count). ``--torch`` times the same MAE model and batch in
PyTorch eager (Hugging Face ``ViTMAEForPreTraining``) in the same process for comparison.
``--suite=gpu`` runs the GPU benchmark suite (MAE B/16, attention and remat variants, XLA flags,
CLIP B/16, DINOv2 L/14, PyTorch eager and compiled, the loader at 224 px) into one JSON-lines file
and one Markdown table; see :mod:`medfm_jax.bench_suite`.
"""
from __future__ import annotations

import os
import tempfile

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from medfm_jax import bench_suite, bench_torch
from medfm_jax.data import build, image_files, phantoms, pipeline
from medfm_jax.models import vit
from medfm_jax.train import telemetry


def benchmark_train_step(config, steps: int = 10, warmup: int = 2) -> dict[str, float]:
  """Compiles and times the train step of ``config`` at its batch size on all local devices (one
  batch of real examples, tiled; see :func:`medfm_jax.bench_suite.time_train_step`)."""
  result = bench_suite.time_train_step(config, config.batch_size, steps, warmup)
  n_dev = jax.device_count()
  return {**result, "images_per_s_per_device": result["images_per_s"] / n_dev, "devices": n_dev,
          "loss_finite": bool(np.isfinite(result["loss"]))}


def benchmark_data(config, num_batches: int = 30) -> dict[str, float]:
  """Images/s of phantom generation (one record at a time) and of the train iterator."""
  return {"phantoms_images_per_s": phantoms.benchmark_phantoms(config.data.image_size, config.data.channels, 1000),
          "train_iterator_images_per_s": pipeline.benchmark_train_iterator(
              config.data, config.batch_size, num_batches=num_batches)}


def write_bench_data(root: str, num_examples: int, image_size: int) -> dict[str, dict]:
  """Writes a PNG folder, a DICOM folder and a TFDS dataset (from the PNGs) of phantoms under
  ``root``; returns the data.* overrides that read each (all examples in the train split)."""
  png, dcm = os.path.join(root, "png"), os.path.join(root, "dicom")
  image_files.export_phantoms(png, num_examples, image_size, "png")
  image_files.export_phantoms(dcm, num_examples, image_size, "dicom")
  build.build("folder", os.path.join(root, "tfds"), "bench", path=png, splits="train:1")
  return {"phantoms": {"source": "phantoms"},
          "folder": {"source": "folder", "path": png, "splits": "train:1"},
          "dicom": {"source": "folder", "path": dcm, "splits": "train:1"},
          "tfds": {"source": "tfds", "name": "bench:1.0.0", "data_dir": os.path.join(root, "tfds")}}


def benchmark_data_sources(config, sources, workers, num_examples: int = 512,
                           num_batches: int = 30) -> list[dict]:
  """Train-iterator images/s of the config's pipeline for each source x worker count."""
  rows = []
  with tempfile.TemporaryDirectory() as root:
    overrides = write_bench_data(root, num_examples, config.data.image_size)
    for name in sources:
      if name not in overrides:
        raise app.UsageError(f"--data_sources: unknown {name!r}; allowed {', '.join(overrides)}")
      for w in workers:
        data_cfg = config.data.copy_and_resolve_references()
        data_cfg.update(overrides[name], num_workers=int(w))
        rows.append({"source": name, "workers": int(w), **pipeline.time_train_iterator(
            data_cfg, config.batch_size, num_batches=num_batches)})
  return rows


def data_table(rows: list[dict]) -> str:
  """Markdown table: source x workers -> images/s (and images per CPU second in-process)."""
  cpu = lambda r: "" if r.get("images_per_cpu_s") is None else f"{r['images_per_cpu_s']:,.0f}"
  lines = ["| source | workers | images/s | images/CPU-s (in-process) |", "|---|---|---|---|"]
  lines += [f"| {r['source']} | {r['workers']} | {r['images_per_s']:,.0f} | {cpu(r)} |" for r in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  if _SUITE.value:
    if not _OUT.value:
      raise app.UsageError("--suite=gpu needs --out=DIR")
    try:
      bench_suite.run_suite(_OUT.value, smoke=_SMOKE.value, cases=_CASES.value, steps=_STEPS.value,
                            warmup=_WARMUP.value, deadline_s=_DEADLINE.value or float("inf"),
                            child=_SUITE_CHILD.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    if not _SUITE_CHILD.value:
      print(f"wrote {_OUT.value}/{bench_suite.JSONL} and {_OUT.value}/{bench_suite.TABLE}")
    return
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required (or --suite=gpu --out=DIR)")
  desc = {"model": config.model.get("variant"), "objective": config.objective.get("name"),
          "image_size": config.data.image_size, "channels": config.data.channels,
          "batch_size": config.batch_size, "dtype": config.dtype, "backend": jax.default_backend()}
  if _DATA_ONLY.value:
    result = dict(desc, **benchmark_data(config))
    rows = benchmark_data_sources(config, _DATA_SOURCES.value, _DATA_WORKERS.value,
                                  _DATA_EXAMPLES.value)
    result["sources"] = rows
    print(data_table(rows))
  else:
    result = dict(desc, **benchmark_train_step(config, _STEPS.value, _WARMUP.value))
    if _TORCH.value:
      m = config.model
      torch_result = bench_torch.torch_mae_train_step_time(
          vit.size_from_config(m), config.data.image_size, config.data.channels, config.batch_size,
          m.decoder_width, m.decoder_depth, m.decoder_heads, steps=_STEPS.value, warmup=_WARMUP.value)
      result.update({f"torch_{k}": v for k, v in torch_result.items()})
      result["jax_over_torch_time"] = result["step_time_median_s"] / torch_result["step_time_median_s"]
  for k, v in result.items():
    if k == "sources":   # printed as the table above
      continue
    print(f"{k:>28}: {v:.4g}" if isinstance(v, float) else f"{k:>28}: {v}")
  telemetry.append_jsonl(_JSON.value, result)
  logging.flush()


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module as a library
  # (tests, other CLIs) never clashes with another CLI's flags of the same name.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mae.py:tiny.")
  _STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
  _WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  _TORCH = flags.DEFINE_bool("torch", False, "Also time the PyTorch eager MAE (HF transformers).")
  _DATA_ONLY = flags.DEFINE_bool("data_only", False, "Benchmark only the input pipeline.")
  _JSON = flags.DEFINE_string("json", None, "Append the result as one JSON line to this file.")
  _DATA_SOURCES = flags.DEFINE_list("data_sources", ["phantoms", "folder", "dicom", "tfds"],
                                    "--data_only: sources to time (phantoms, folder = PNG folder, "
                                    "dicom = DICOM folder, tfds = array_record built from the PNGs).")
  _DATA_WORKERS = flags.DEFINE_list("data_workers", ["0", "2"], "--data_only: worker counts to time.")
  _DATA_EXAMPLES = flags.DEFINE_integer("data_examples", 512, "--data_only: files written per source.")
  _SUITE = flags.DEFINE_enum("suite", None, ["gpu"], "Run a benchmark suite instead of one config.")
  _OUT = flags.DEFINE_string("out", None, "--suite: folder for bench_gpu.jsonl and bench_gpu.md.")
  _SMOKE = flags.DEFINE_bool("smoke", False, "--suite: every case at tiny size (any backend).")
  _CASES = flags.DEFINE_list("cases", None, f"--suite: cases to run (default all): {', '.join(bench_suite.CASE_NAMES)}.")
  _DEADLINE = flags.DEFINE_float("deadline_s", 0.0, "--suite: skip cases that would start after this many seconds (0 = none).")
  _SUITE_CHILD = flags.DEFINE_bool("suite_child", False, "Internal: one case in its own process.")
  app.run(main)
