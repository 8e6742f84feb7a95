"""Compiler options by what a program is for.

A program that runs once per run (parameter and train-state initialisation; also the few
pictures an evaluation writes: MAE reconstructions, DINO attention maps) gains nothing from
LLVM's optimisation of its kernels, and on the CPU backend that optimisation is most of its
compile time: :func:`jit_once` compiles such programs at XLA's ``xla_backend_optimization_level=0``
on CPU (other backends keep their defaults). Measured on 2026-11-30 (tests/conftest.py's XLA
flags, CPU-s of ``compile``): the tiny MAE's train-state init 4.6 -> 2.0, tiny CLIP 6.6 -> 2.6, its
8-device FSDP init 10.4 -> 3.3. The random bits are the same (integer arithmetic); their float
transforms (normal, truncated normal) differ from the default compile in a few leaves: within 2
float32 ulps in the tiny MAE (``tests/parallel/test_programs.py``), by at most 7.5e-9 in the tiny
DINOv2, CLIP and FLAVA states (checked by hand, 2026-11-30).

Train and eval steps keep the default level: their kernels run at every step. (A NaN gradient
norm that the tiny CLIP's step once gave at level 0 was the max-pooled cls slot's gradient, which
depended on how XLA fused the model; ``models/vit.py`` gathers the maximum at its argmax since.)
"""
from __future__ import annotations

from typing import Any, Callable

import jax

ONCE_CPU_OPTIONS = {"xla_backend_optimization_level": 0}


def once_compiler_options() -> dict[str, Any] | None:
  """The compiler options of a run-once program on the default backend (None: the defaults)."""
  return dict(ONCE_CPU_OPTIONS) if jax.default_backend() == "cpu" else None


def jit_once(fn: Callable[..., Any], **jit_kwargs) -> Callable[..., Any]:
  """``jax.jit(fn, **jit_kwargs)`` for a program that runs once per run: compiled without the
  backend's optimisation on CPU (see the module docstring). Call it outside any trace: jax
  refuses compiler options on a jit nested in another (``jax.eval_shape`` of it included)."""
  return jax.jit(fn, compiler_options=once_compiler_options(), **jit_kwargs)
