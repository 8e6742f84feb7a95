r"""Plans a big run without its hardware: AOT-compiles the train step on N fake CPU devices, or
for a TPU slice with the TPU compiler (``--topology``, no TPU needed: the ``tpu`` extra's libtpu).

  python -m medfm_jax.plan --config=configs/mae.py:vit_h14 --devices=256 --chip=v5p \
      --config.mesh.data=1 --config.mesh.fsdp=-1 --config.dtype=bfloat16
  python -m medfm_jax.plan --config=configs/mae3d.py:primus_m --topology=v5p-128 \
      --config.mesh.data=2 --config.mesh.fsdp=32

With ``--topology`` the step is compiled by XLA:TPU for the slice's chips (JAX's deviceless
ahead-of-time compilation), so the memory is the TPU program's, and ``model.attention_impl='auto'``
is the Pallas flash kernel as on a real TPU (``models/tpu_attention.py``). On fake CPU devices
XLA's attention is compiled. Nothing is materialised or executed: the train state comes from
``jax.eval_shape`` and the batch is a tree of ``jax.ShapeDtypeStruct`` with the run's shardings.
Prints one Markdown table row per run (``--json=FILE`` appends the numbers as a JSON line):

* per-device bytes of params, optimizer state, other state (EMA teacher, ...), the batch, and
  the step's peak temporaries (``compiled.memory_analysis()``); whether the total fits the chip;
* FLOPs per step (XLA cost analysis of the whole step before partitioning, with any
  ``model.scan`` loop, ``grad_accum_steps`` microbatch loop and ``model.attention_chunk`` query loop
  unrolled since the analysis counts a loop body once);
* an estimated step time and MFU on ``--chip``: ``max(compute, collectives)`` with perfect
  overlap, from the chip's peak (``train/telemetry.PEAK_TFLOPS``) and interconnect bandwidth
  (:data:`CHIPS`); so the MFU is an upper bound. Collective bytes are parsed from the partitioned
  HLO (loop bodies times their trip counts). An HBM-traffic time from XLA's "bytes accessed" is
  printed separately but left out of the estimate: XLA:CPU fuses far less than TPU/GPU, so that
  term would dominate every row (e.g. 2.5 s for DINOv2 g/14 at 256 chips vs 0.08 s of
  collectives) without telling anything about the real chip.
"""
from __future__ import annotations

import math
import os
import re
import sys
import time

import jax
from absl import app, flags, logging
from jax.experimental import topologies
from ml_collections import config_flags

from medfm_jax import config as config_lib
from medfm_jax.models import tpu_attention, vit
from medfm_jax.parallel import mesh as mesh_lib
from medfm_jax.train import assemble, telemetry


GIB = 2 ** 30
# Per chip: HBM GiB, HBM bandwidth GB/s, interconnect GB/s used for collectives (TPU: total ICI
# per chip; GPU: the 400 Gb/s InfiniBand NIC per GPU, since a large mesh spans nodes).
CHIPS = {
    "v4": (32, 1200, 300), "v5e": (16, 819, 200), "v5p": (95, 2765, 600), "v6e": (32, 1640, 448),
    "a100": (80, 2039, 50), "h100": (80, 3350, 50), "h200": (141, 4800, 50),
}
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\((.*)$")


def chip_spec(chip: str) -> dict[str, float]:
  """Peak TFLOP/s (from the telemetry table), HBM GiB and bandwidths of a chip name like 'v5p'."""
  key = chip.lower()
  if key not in CHIPS:
    raise ValueError(f"--chip={chip!r}: allowed {sorted(CHIPS)}")
  peak = next(v for k, v in telemetry.PEAK_TFLOPS.items() if k in (key, f"tpu {key}"))
  hbm, hbm_bw, link_bw = CHIPS[key]
  return {"peak_tflops": peak, "hbm_gib": hbm, "hbm_gbs": hbm_bw, "link_gbs": link_bw}


def _shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string, e.g. ``bf16[8,128]{1,0}`` or a tuple of such shapes."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", shape):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _group_size(attrs: str, num_devices: int) -> int:
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if iota:
    return int(iota.group(2))
  explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if explicit:
    return len(explicit.group(1).split(","))
  return num_devices


def computation_multipliers(hlo_text: str) -> dict[str, int]:
  """How many times each computation of an HLO module runs per call of its entry: while bodies
  count ``known_trip_count`` times (XLA's cost analysis counts a loop body once)."""
  comps: list[tuple[str, list[str]]] = []
  entry = None
  for line in hlo_text.splitlines():
    head = re.match(r"(ENTRY\s+)?%?([\w.-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      comps.append((head.group(2), []))
      entry = head.group(2) if head.group(1) else entry
    elif comps:
      comps[-1][1].append(line)
  mult = {name: 0 for name, _ in comps}
  if entry is None:
    return mult
  mult[entry] = 1
  for name, lines in reversed(comps):          # callers are printed after their callees
    for line in lines:
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      for key, callee in re.findall(r"\b(body|condition|to_apply|calls|branch_computations)="
                                    r"\{?%?([\w.-]+)", line):
        factor = int(trips.group(1)) if key == "body" and trips else 1
        mult[callee] = mult.get(callee, 0) + mult[name] * factor
  return mult


def collective_bytes(hlo_text: str, num_devices: int) -> float:
  """Bytes each device sends per step in the collectives of a partitioned HLO program (loop
  bodies times their trip counts), for bandwidth-optimal (ring) algorithms over groups of n:
  all-gather out·(n-1)/n, reduce-scatter out·(n-1), all-reduce 2·S·(n-1)/n, all-to-all
  S·(n-1)/n, collective-permute S."""
  mult = computation_multipliers(hlo_text)
  total, current = 0.0, None
  for line in hlo_text.splitlines():
    head = re.match(r"(ENTRY\s+)?%?([\w.-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      current = head.group(2)
      continue
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    shape, op, attrs = m.groups()
    size, n = _shape_bytes(shape), _group_size(attrs, num_devices)
    if "-start(" in m.group(0) and shape.startswith("("):
      size //= 2   # async start ops return (operand, result)
    if n <= 1:
      continue
    factor = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n,
              "all-to-all": (n - 1) / n, "collective-permute": 1.0}[op]
    total += size * factor * mult.get(current, 1)
  return total


# TPU slices of a 3-D torus, named by TensorCores (2 per chip, one megacore device each):
# generation -> (topology prefix, chip name of CHIPS).
TORUS_SLICES = {"v4": ("v4", "v4"), "v5p": ("v5", "v5p")}
_CHIPS_PER_HOST = (2, 2, 1)


def torus_shape(chips: int) -> tuple[int, int, int]:
  """The slice's chip grid: 2x2x1 for 4 chips, then the last of the smallest sides doubles
  (8: 2x2x2, 16: 2x2x4, 32: 2x4x4, 64: 4x4x4, 128: 4x4x8, ...), as Cloud TPU shapes them."""
  if chips < 4 or chips & (chips - 1):
    raise ValueError(f"a {chips}-chip slice: allowed a power of two of at least 4 chips")
  shape = [2, 2, 1]
  while math.prod(shape) < chips:
    i = max(j for j in range(3) if shape[j] == min(shape))
    shape[i] *= 2
  return tuple(shape)


def parse_topology(name: str) -> tuple[str, tuple[int, int, int]]:
  """``'v5p-128'`` -> (``'v5p'``, chip grid): a slice of N TensorCores, N/2 chips."""
  generation, _, cores = name.lower().partition("-")
  if generation not in TORUS_SLICES or not cores.isdigit() or int(cores) % 2:
    raise ValueError(f"--topology={name!r}: allowed {'/'.join(f'{g}-N' for g in TORUS_SLICES)} "
                     f"(N TensorCores, 2 per chip, e.g. v5p-128 = 64 chips)")
  try:
    return generation, torus_shape(int(cores) // 2)
  except ValueError as e:
    raise ValueError(f"--topology={name!r}: {e}") from None


def tpu_devices(name: str) -> list:
  """The devices of a TPU slice for ahead-of-time compilation on a host without TPUs (libtpu's
  topology description, megacore: one device per chip)."""
  generation, shape = parse_topology(name)
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")   # no Cloud TPU metadata server to ask
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # no chips to guard: plans may run side by side
  wrap = (min(shape) >= 4,) * 3                       # full cubes are tori
  try:
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{TORUS_SLICES[generation][0]}:{'x'.join(map(str, shape))}",
        chip_config_name="megacore", chips_per_host_bounds=_CHIPS_PER_HOST, num_slices=1, wrap=wrap)
  except Exception as e:  # pylint: disable=broad-except  (libtpu missing or refusing the slice)
    raise ValueError(f"--topology={name!r}: no TPU compiler ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200]}); install the tpu extra: pip install -e '.[tpu]'") from None
  return list(topology.devices)


def _attention(config) -> str:
  """The attention of the config's ViT (``model.attention_impl``, default 'auto') resolved for the
  target platform; SAM's own ViTDet encoder (``objective.encoder='vitdet'``) runs XLA's instead."""
  return vit.resolve_attention_impl(config.model.get("attention_impl", "auto"), vit.COMPUTE_DTYPES[config.dtype])


def _per_device_bytes(tree) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def _cost(stage) -> dict:
  cost = stage.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def plan(config, chip: str = "v5p", hbm_gib: float = 0.0, devices=None) -> dict:
  """Compiles the config's train step for ``devices`` (default: all of JAX's, e.g. fake CPU
  ones; TPU devices from :func:`tpu_devices` compile with XLA:TPU, attention 'auto' as on a TPU);
  returns the memory/FLOP plan."""
  platform = (devices or jax.devices())[0].platform
  with tpu_attention.target_platform(platform):
    return _plan(config, chip, hbm_gib, devices)


def _plan(config, chip: str, hbm_gib: float, devices) -> dict:
  spec = chip_spec(chip)
  config_lib.validate(config, num_devices=len(devices) if devices else None)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  shape = dict(mesh.shape)
  assembly = assemble.assemble(config, mesh)
  abstract, batch = assembly.abstract_state, assembly.abstract_batch
  lowered = assembly.lower()
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  unrolled = telemetry.flop_counting_config(config)
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  if unrolled is not None or not on_cpu:
    # FLOPs of the same step unrolled: the layer scan, the gradient-accumulation scan and chunked
    # attention are loops whose body XLA's cost analysis counts once (one accumulation step = one
    # full-batch step); the Pallas kernel is a custom call it does not count at all. XLA:TPU's
    # compile-only client analyses no lowered program, and the whole step's FLOPs before
    # partitioning are the same lowered for one CPU device.
    count_mesh = mesh if on_cpu else mesh_lib.make_mesh(
        {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices("cpu")[:1])
    lowered = assemble.assemble(unrolled or config, count_mesh, batch).lower()
  n = mesh.size
  mem = compiled.memory_analysis()
  params, opt = _per_device_bytes(abstract.params), _per_device_bytes(abstract.opt_state)
  state_total = _per_device_bytes(abstract)
  batch_bytes = _per_device_bytes(batch)
  temp = int(mem.temp_size_in_bytes)
  total = state_total + batch_bytes + temp
  # XLA's cost analysis counts a loop body once: FLOPs come from the unrolled program (before
  # partitioning: whole-step FLOPs) and the compiled program's HBM bytes are scaled alike.
  flops = float(_cost(lowered).get("flops", float("nan")))
  compiled_cost = _cost(compiled)
  loop_factor = flops / (float(compiled_cost.get("flops", float("nan"))) * n)
  hbm_traffic = float(compiled_cost.get("bytes accessed", float("nan"))) * max(loop_factor, 1.0)
  comm = collective_bytes(compiled.as_text(), n)
  t_compute = flops / n / (spec["peak_tflops"] * 1e12)
  t_memory = hbm_traffic / (spec["hbm_gbs"] * 1e9)
  t_comm = comm / (spec["link_gbs"] * 1e9)
  step = max(t_compute, t_comm)     # t_memory: XLA:CPU's traffic, not the chip's (see above)
  capacity = hbm_gib or spec["hbm_gib"]
  return {
      "model": config.model.get("variant"), "objective": config.objective.get("name"),
      "batch_size": config.batch_size, "dtype": config.dtype, "devices": n, "mesh": shape,
      "chip": chip, "platform": mesh.devices.flat[0].platform,
      "attention": _attention(config),
      "params_gib": params / GIB, "opt_state_gib": opt / GIB,
      "other_state_gib": (state_total - params - opt) / GIB, "batch_gib": batch_bytes / GIB,
      "temp_gib": temp / GIB, "total_gib": total / GIB, "hbm_gib": capacity,
      "fits": total / GIB <= capacity, "argument_gib": mem.argument_size_in_bytes / GIB,
      "tflop_per_step": flops / 1e12, "collective_gib_per_device": comm / GIB,
      "t_compute_s": t_compute, "t_memory_s": t_memory, "t_collective_s": t_comm,
      "est_step_s": step, "est_mfu": t_compute / step if step else float("nan"),
      "loop_factor": loop_factor, "compile_s": compile_s,
  }


_COLUMNS = (("model", "model", "{}"), ("mesh", "mesh (data×fsdp×tensor)", "{}"),
            ("batch_size", "batch", "{}"), ("params_gib", "params GiB", "{:.2f}"),
            ("opt_state_gib", "opt state GiB", "{:.2f}"), ("other_state_gib", "other state GiB", "{:.2f}"),
            ("temp_gib", "temps GiB", "{:.2f}"), ("total_gib", "total GiB", "{:.2f}"),
            ("fits", "fits", "{}"), ("tflop_per_step", "TFLOP/step", "{:.1f}"),
            ("est_step_s", "est. step s", "{:.3f}"), ("est_mfu", "est. MFU", "{:.0%}"))


def markdown_table(rows: list[dict]) -> str:
  """Markdown table of plan results (one row each)."""
  def cell(key, fmt, row):
    value = row[key]
    if key == "mesh":
      value = "×".join(str(value[a]) for a in ("data", "fsdp", "tensor"))
    if key == "fits":
      value = f"{'yes' if value else 'no'} (≤ {row['hbm_gib']:g})"
    return fmt.format(value)
  lines = ["| " + " | ".join(h for _, h, _ in _COLUMNS) + " |",
           "|" + "---|" * len(_COLUMNS)]
  lines += ["| " + " | ".join(cell(k, f, r) for k, _, f in _COLUMNS) + " |" for r in rows]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DEVICES.value < 1:
    raise app.UsageError(f"--devices={_DEVICES.value}: must be a positive integer")
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", _DEVICES.value)   # before the backend starts
  chip, devices = _CHIP.value, None
  try:
    if _TOPOLOGY.value:
      chip = TORUS_SLICES[parse_topology(_TOPOLOGY.value)[0]][1]
      # XLA:TPU's compile-only client cannot load cached executables: no cache lookups to warn about.
      jax.config.update("jax_enable_compilation_cache", False)
      devices = tpu_devices(_TOPOLOGY.value)
    chip_spec(chip)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  try:
    result = plan(_CONFIG.value, chip, _HBM_GIB.value, devices)
  except config_lib.ConfigError as e:
    sys.stderr.write(f"medfm_jax: config error: {e}\n")
    sys.exit(2)
  print(markdown_table([result]))
  where = (f"XLA:TPU for {_TOPOLOGY.value} ({result['devices']} chips)" if _TOPOLOGY.value
           else f"{result['devices']} fake CPU devices")
  print(f"compiled by {where}, attention {result['attention']!r}, in {result['compile_s']:.1f}s; "
        f"per step: compute {result['t_compute_s']:.3f}s, HBM traffic of the compiled program "
        f"{result['t_memory_s']:.3f}s (not in the estimate), collectives {result['t_collective_s']:.3f}s "
        f"({result['collective_gib_per_device']:.2f} GiB/device)")
  telemetry.append_jsonl(_JSON.value, result)
  logging.flush()


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module as a library
  # (tests, other CLIs) never clashes with another CLI's flags of the same name.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mae.py:vit_h14.")
  _DEVICES = flags.DEFINE_integer("devices", 8, "Number of fake CPU devices to plan for.")
  _CHIP = flags.DEFINE_string("chip", "v5p", "Chip for the time/MFU estimate and the fit check.")
  _TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU slice to compile for with XLA:TPU instead "
                                  "of fake CPU devices: v4-N or v5p-N (N TensorCores, e.g. v5p-128 "
                                  "= 64 chips); sets the chip, ignores --devices. Needs the tpu extra.")
  _HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "Memory per chip for the fit check (0 = the chip's).")
  _JSON = flags.DEFINE_string("json", None, "Append the result as one JSON line to this file.")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  flags.mark_flags_as_required(["config"])
  app.run(main)
