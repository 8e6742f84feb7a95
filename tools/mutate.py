#!/usr/bin/env python
"""Mutation check: one-line bugs in the trainer, sharding and loss code that the tests must catch.

Each mutant replaces one exact line fragment (it must occur exactly once in its file; a stale
mutant is refused, never skipped) in a throwaway copy of the repository (the tracked and untracked,
not ignored, files of the working tree), checks that the mutated file still compiles, and runs the
tests expected to kill it (``pytest -x``, the copy's root first on ``sys.path``). Exit code 1 of
pytest (a test failed) = killed; 0 = SURVIVED; anything else (collection or usage error, timeout,
a mutant that does not compile) = error. First the listed tests run once on the unmutated copy:
they must pass, otherwise a "kill" would mean nothing.

  python tools/mutate.py                 # all mutants, markdown table on stdout
  python tools/mutate.py --only NAME ... # some of them
  python tools/mutate.py --list          # names, files and killer tests

Exit status 0 only when every mutant run was killed. The working tree is never modified.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP = "medfm_jax/train/state.py"
LOOP = "medfm_jax/train/loop.py"
OPTIM = "medfm_jax/train/optim.py"
MESH = "medfm_jax/parallel/mesh.py"
CLIP = "medfm_jax/objectives/clip_losses.py"
DINO = "medfm_jax/objectives/dino.py"
DINO_LOSSES = "medfm_jax/objectives/dino_losses.py"

# Killer tests, fastest first (pytest -x stops at the first failure). The 1-vs-N device tests see
# a gradient scale only if they compare gradients (grad_norm, an SGD step): Adam cancels it.
CLIP_1_VS_8 = "tests/objectives/test_clip.py::test_train_steps_equal_on_1_and_8_devices"
MULTI_DEVICE = {
    "8.0": (CLIP_1_VS_8, "tests/train/test_trainer.py::test_sharded_steps_match_single_device"),
    "2.0": (CLIP_1_VS_8, "tests/objectives/test_flava.py::test_train_steps_equal_on_1_and_8_devices"),
    "0.5": (CLIP_1_VS_8,
            "tests/objectives/test_dino.py::test_dinov2_trains_identically_on_one_and_eight_devices"),
}
CLIP_REFERENCE = ("tests/objectives/test_clip_losses.py::"
                  "test_loss_matches_reference_and_is_mesh_independent",)
ROW_MASK = ("tests/objectives/test_flava_losses.py::"
            "test_contrastive_valid_rows_are_the_loss_of_the_paired_rows_alone",)
SMOOTHING = ("tests/objectives/test_supervised.py::test_loss_is_label_smoothed_cross_entropy_of_labelled_rows",)
DINO_STEP = "tests/objectives/test_dino.py::test_step_updates_teacher_by_ema_center_and_keeps_last_layer_frozen"
MASKING = ("tests/models/test_mae.py::test_random_masking_invariants",)
_UPDATE = "    updates, opt_state = tx.update(grads, state.opt_state, state.params)"


def _scale_grads_on_meshes(factor: str) -> str:
  """The train step's gradients times ``factor`` whenever the mesh has more than one device (a
  psum where a mean belongs, or a mean over the wrong axes)."""
  return (f"    grads = jax.tree.map(lambda g: g * ({factor} if jax.sharding.get_abstract_mesh().size > 1 "
          f"else 1.0), grads); " + _UPDATE.lstrip())


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str                 # relative to the repository root
  original: str             # exact text; must occur exactly once in the file, on one line
  replacement: str          # one line
  tests: tuple[str, ...]    # pytest node ids expected to kill it


MUTANTS = (
    # --- trainer: gradient scale, accumulation, NaN guard, optimizer
    Mutant("grad_scale_x8_on_mesh", STEP, _UPDATE, _scale_grads_on_meshes("8.0"), MULTI_DEVICE["8.0"]),
    Mutant("grad_scale_x2_on_mesh", STEP, _UPDATE, _scale_grads_on_meshes("2.0"), MULTI_DEVICE["2.0"]),
    Mutant("grad_scale_half_on_mesh", STEP, _UPDATE, _scale_grads_on_meshes("0.5"), MULTI_DEVICE["0.5"]),
    Mutant("accum_sum_not_mean", STEP, "grads = jax.tree.map(lambda g: g / accum, grads)",
           "grads = jax.tree.map(lambda g: g, grads)",
           ("tests/train/test_step.py::test_gradient_accumulation_matches_full_batch",)),
    # Every _check_finite in the loop deferred to the last step (= moved after the loop).
    Mutant("nan_guard_after_loop", LOOP, "  total, step = config.total_steps, trainer.start_step",
           "  total, step = config.total_steps, trainer.start_step; _check_finite = "
           "lambda s, check=globals()['_check_finite']: check(s) if step >= total else None",
           ("tests/train/test_trainer.py::test_nonfinite_loss_stops_without_saving_bad_state",)),
    Mutant("weight_decay_on_norms_and_tokens", OPTIM, 'getattr(path[-1], "key", None) == "kernel"',
           'getattr(path[-1], "key", None) != "bias"',
           ("tests/train/test_step.py::test_weight_decay_only_on_kernels",)),
    Mutant("warmup_half_length", OPTIM, "  warmup = min(config.warmup_steps, config.total_steps)",
           "  warmup = min(config.warmup_steps, config.total_steps) // 2",
           ("tests/train/test_step.py::test_lr_schedule_warmup_then_cosine",)),
    Mutant("per_param_clip_never_clips", OPTIM, "g * jnp.minimum(1.0, max_norm / (norm + 1e-6))",
           "g * jnp.maximum(1.0, max_norm / (norm + 1e-6))",
           ("tests/train/test_step.py::test_per_param_clipping_clips_each_tensor_independently",)),
    Mutant("last_layer_frozen_one_step_longer", OPTIM, "    frozen = state.count < steps",
           "    frozen = state.count <= steps",
           ("tests/train/test_step.py::test_frozen_for_steps_and_lr_multipliers",)),
    # --- sharding
    Mutant("params_not_fsdp_sharded", MESH, '    ("embed", ("fsdp", None)),', '    ("embed", (None,)),',
           ("tests/train/test_scale_configs.py::test_paper_config_is_fsdp_sharded[vit_b16]",)),
    Mutant("clip_blocks_pmean_not_psum", CLIP,
           "return jax.lax.psum(_block_sums(i, t, s, c, kind, axes, *v), axes)",
           "return jax.lax.pmean(_block_sums(i, t, s, c, kind, axes, *v), axes)", CLIP_REFERENCE),
    Mutant("clip_block_labels_not_offset", CLIP, "    offset = jax.lax.axis_index(axes) * b",
           "    offset = 0 * b", CLIP_REFERENCE),
    # --- contrastive losses
    Mutant("clip_logit_scale_clamp_ln1000", CLIP, "MAX_LOGIT_SCALE = math.log(100.0)",
           "MAX_LOGIT_SCALE = math.log(1000.0)",
           ("tests/objectives/test_clip_losses.py::test_logit_scale_clamped_to_0_ln100",)),
    Mutant("clip_logit_scale_no_lower_clamp", CLIP, "jnp.exp(jnp.clip(s, 0.0, max_value))",
           "jnp.exp(jnp.clip(s, -10.0, max_value))",
           ("tests/objectives/test_clip_losses.py::test_logit_scale_clamped_to_0_ln100",)),
    Mutant("siglip_bias_sign", CLIP, "    logits = logits_i + bias", "    logits = logits_i - bias",
           CLIP_REFERENCE),
    Mutant("siglip_labels_flipped", CLIP, "[None, :], 1.0, -1.0)", "[None, :], -1.0, 1.0)",
           CLIP_REFERENCE),
    Mutant("contrastive_invalid_rows_kept_as_anchors", CLIP,
           "return per_row if valid is None else jnp.where(valid, per_row, 0.0)", "return per_row",
           ROW_MASK),
    Mutant("contrastive_invalid_rows_kept_as_negatives", CLIP,
           "logits = jnp.where(cols[None, :], logits, _MASKED_LOGIT)", "logits = logits",
           ROW_MASK),
    # --- DINO / DINOv2
    Mutant("dino_ema_momentum_swapped", DINO, "lambda t, s: m * t + (1.0 - m) * s",
           "lambda t, s: (1.0 - m) * t + m * s",
           ("tests/objectives/test_dino.py::test_after_update_is_ema_with_cosine_momentum",)),
    Mutant("dino_ema_schedule_reversed", DINO,
           "cosine_schedule(step, self.config.total_steps, self.config.objective.momentum_teacher, 1.0)",
           "cosine_schedule(step, self.config.total_steps, 1.0, self.config.objective.momentum_teacher)",
           ("tests/objectives/test_dino.py::test_after_update_is_ema_with_cosine_momentum",)),
    Mutant("dino_cosine_schedule_inverted", DINO_LOSSES, "0.5 * (1.0 + jnp.cos(jnp.pi * frac))",
           "0.5 * (1.0 - jnp.cos(jnp.pi * frac))",
           ("tests/objectives/test_dino_losses.py::test_schedules",)),
    Mutant("dino_center_momentum_complement", DINO, 'extra["center"], teacher_logits, o.center_momentum)',
           'extra["center"], teacher_logits, 1.0 - o.center_momentum)', (DINO_STEP,)),
    Mutant("dino_teacher_temp_warmup_skipped", DINO, "o.warmup_teacher_temp, o.teacher_temp)",
           "o.teacher_temp, o.teacher_temp)", (DINO_STEP,)),
    Mutant("center_momentum_swapped", DINO_LOSSES,
           "  return momentum * _f32(center) + (1.0 - momentum) * batch_mean",
           "  return (1.0 - momentum) * _f32(center) + momentum * batch_mean",
           ("tests/objectives/test_dino_losses.py::test_update_center_momentum",)),
    Mutant("teacher_temp_schedule_reversed", DINO_LOSSES, "  return start + (end - start) * frac",
           "  return end + (start - end) * frac",
           ("tests/objectives/test_dino_losses.py::test_schedules",)),
    Mutant("sinkhorn_prototypes_normalised_per_sample", DINO_LOSSES,
           "jax.nn.logsumexp(log_q, axis=0, keepdims=True) - math.log(k)",
           "jax.nn.logsumexp(log_q, axis=1, keepdims=True) - math.log(k)",
           ("tests/objectives/test_dino_losses.py::test_sinkhorn_matches_numpy",)),
    Mutant("koleo_nearest_neighbour_is_itself", DINO_LOSSES,
           "dots = jnp.where(jnp.eye(n, dtype=bool), -1.0, dots)", "dots = dots",
           ("tests/objectives/test_dino_losses.py::test_koleo_matches_numpy",)),
    Mutant("ibot_mean_over_masked_images_only", DINO_LOSSES, "return jnp.sum(per_image) / m.shape[0]",
           "return jnp.sum(per_image) / jnp.maximum(jnp.sum(jnp.any(m > 0, axis=-1)), 1)",
           ("tests/objectives/test_dino_losses.py::test_ibot_matches_numpy",)),
    # --- LoRA, MAE, supervised
    Mutant("lora_scale_inverted", "medfm_jax/peft/lora.py",
           "return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)",
           "return (math.sqrt(self.rank) if self.rslora else self.rank) / self.alpha",
           ("tests/peft/test_lora.py::test_rslora_scale",
            "tests/peft/test_lora.py::test_apply_formula_and_merge_roundtrip")),
    Mutant("mae_keeps_mask_ratio", "medfm_jax/models/mae.py", "n_keep = int(length * (1 - mask_ratio))",
           "n_keep = int(length * mask_ratio)", MASKING),
    Mutant("mae_keeps_one_more", "medfm_jax/models/mae.py", "n_keep = int(length * (1 - mask_ratio))",
           "n_keep = int(length * (1 - mask_ratio)) + 1",
           MASKING),
    Mutant("mae_loss_on_all_patches", "medfm_jax/models/mae.py",
           "return (per_patch * mask).sum() / mask.sum()", "return per_patch.mean()",
           ("tests/models/test_mae.py::test_loss_on_hand_computable_input",)),
    Mutant("label_smoothing_dropped", "medfm_jax/objectives/supervised.py",
           "self._ce(logits, labels, self.config.objective.label_smoothing)", "self._ce(logits, labels)",
           SMOOTHING),
    Mutant("label_smoothing_inverted", "medfm_jax/objectives/supervised.py",
           "jax.nn.one_hot(labels, self.num_classes), smoothing)",
           "jax.nn.one_hot(labels, self.num_classes), 1.0 - smoothing)",
           SMOOTHING),
)


def check_mutants(mutants, root: str) -> list[str]:
  """Problems that make a mutant unusable (stale text, not one line, unknown test file)."""
  problems = []
  names = [m.name for m in MUTANTS]
  for m in mutants:
    if names.count(m.name) > 1:
      problems.append(f"{m.name}: duplicate name")
    if "\n" in m.original or "\n" in m.replacement or m.original == m.replacement:
      problems.append(f"{m.name}: original and replacement must be different single lines")
    path = os.path.join(root, m.path)
    if not os.path.isfile(path):
      problems.append(f"{m.name}: {m.path} does not exist")
      continue
    with open(path, encoding="utf-8") as f:
      count = f.read().count(m.original)
    if count != 1:
      problems.append(f"{m.name}: original text occurs {count} times in {m.path} (must be exactly "
                      f"once; update the mutant): {m.original!r}")
    if not m.tests:
      problems.append(f"{m.name}: no killer tests listed")
    for t in m.tests:
      if not os.path.isfile(os.path.join(root, t.split("::")[0])):
        problems.append(f"{m.name}: test file of {t} does not exist")
  return problems


def copy_tree(src: str, dst: str) -> None:
  """The working tree's tracked and untracked-but-not-ignored files (uncommitted edits included)."""
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=src, check=True, capture_output=True).stdout.decode().split("\0")
  for rel in filter(None, listed):
    if os.path.isfile(os.path.join(src, rel)):        # tracked but deleted: not copied
      os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
      shutil.copy2(os.path.join(src, rel), os.path.join(dst, rel))


def _env(copy: str) -> dict[str, str]:
  env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")   # no .pyc: a restored file is never stale
  env["PYTHONPATH"] = os.pathsep.join([copy] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def run_pytest(copy: str, tests, stop_first: bool, timeout: float):
  """(exit code or None on timeout, failed/errored node ids, output tail, seconds)."""
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
         *(["-x"] if stop_first else []), *tests]
  t0 = time.perf_counter()
  try:
    r = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    return None, [], out[-3000:], time.perf_counter() - t0
  out = r.stdout + r.stderr
  failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
  return r.returncode, failed, out[-3000:], time.perf_counter() - t0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
  parser.add_argument("--list", action="store_true", help="list the mutants and exit")
  parser.add_argument("--no-baseline", action="store_true",
                      help="skip running the listed tests on the unmutated copy first")
  parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per pytest run")
  parser.add_argument("-v", "--verbose", action="store_true",
                      help="print the end of pytest's output for every mutant (why it was killed)")
  args = parser.parse_args(argv)

  mutants = list(MUTANTS)
  if args.only:
    unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
    if unknown:
      parser.error(f"unknown mutant(s) {', '.join(unknown)}; see --list")
    mutants = [m for m in MUTANTS if m.name in args.only]
  if args.list:
    for m in mutants:
      print(f"{m.name}\t{m.path}\t{' '.join(m.tests)}")
    return 0
  problems = check_mutants(mutants, ROOT)
  if problems:
    print("refusing to run, stale or malformed mutants:\n  " + "\n  ".join(problems), file=sys.stderr)
    return 2

  t_start = time.perf_counter()
  rows, bad = [], 0
  with tempfile.TemporaryDirectory(prefix="medfm_mutate_") as copy:
    copy_tree(ROOT, copy)
    where = subprocess.run([sys.executable, "-c", "import medfm_jax; print(medfm_jax.__file__)"],
                           cwd=copy, env=_env(copy), capture_output=True, text=True).stdout.strip()
    if not where.startswith(copy):
      print(f"the copy is not what Python imports (medfm_jax from {where!r})", file=sys.stderr)
      return 2
    if not args.no_baseline:
      tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
      print(f"baseline: {len(tests)} test ids on the unmutated tree ...", file=sys.stderr, flush=True)
      rc, failed, tail, secs = run_pytest(copy, tests, False, args.timeout)
      if rc != 0:
        print(f"{tail}\nbaseline failed (exit {rc}, {secs:.0f}s): the listed tests must pass without a "
              f"mutant: {', '.join(failed)}", file=sys.stderr)
        return 2
      print(f"baseline passed in {secs:.0f}s", file=sys.stderr, flush=True)
    for i, m in enumerate(mutants):
      path = os.path.join(copy, m.path)
      with open(path, encoding="utf-8") as f:
        source = f.read()
      try:
        with open(path, "w", encoding="utf-8") as f:
          f.write(source.replace(m.original, m.replacement, 1))
        try:
          py_compile.compile(path, cfile=os.path.join(copy, ".mutant.pyc"), doraise=True)
        except py_compile.PyCompileError as e:
          rc, failed, tail, secs = "compile", [], str(e), 0.0
        else:
          rc, failed, tail, secs = run_pytest(copy, m.tests, True, args.timeout)
      finally:
        with open(path, "w", encoding="utf-8") as f:
          f.write(source)
      if rc == 1:
        result, by = "killed", ", ".join(failed) or "(a test failed)"
      elif rc == 0:
        result, by = "SURVIVED", ""
      else:
        result = {"compile": "ERROR (mutant does not compile)", None: "ERROR (timeout)"}.get(
            rc, f"ERROR (pytest exit {rc})")
        by = ""
      if args.verbose or result.startswith("ERROR"):
        print(tail, file=sys.stderr)
      bad += result != "killed"
      rows.append((m.name, m.path, result, by, secs))
      print(f"[{i + 1}/{len(mutants)}] {m.name}: {result} ({secs:.0f}s)", file=sys.stderr, flush=True)

  print("| mutant | file | result | killed by | s |\n|---|---|---|---|---|")
  for name, path, result, by, secs in rows:
    print(f"| {name} | {path} | {result} | {by} | {secs:.0f} |")
  print(f"\n{len(rows) - bad}/{len(rows)} killed in {time.perf_counter() - t_start:.0f}s")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
