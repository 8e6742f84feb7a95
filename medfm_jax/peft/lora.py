"""LoRA as pure parameter-tree transforms: the model code does not change.

``adapters, spec = init(params)`` creates low-rank factors for the kernels whose '/'-joined path
matches one of ``spec.targets``; ``apply(params, adapters, spec)`` returns a param tree with
``W = W0 + scale * reshape(A @ B)`` that the unchanged model consumes. Train ``adapters`` (and a
new head), keep ``params`` frozen; :func:`merge` gives a plain checkpoint.

Shapes. A kernel ``[*batch, *in_dims, *out_dims]`` is viewed as ``batch`` independent matrices
``[prod(in_dims), prod(out_dims)]`` (Flax layout: in, out); see :func:`split_dims` for the rule.
Adapter leaves: ``a [*batch, in, rank]`` ~ U(+-1/sqrt(in)) (Kaiming-uniform, as in
microsoft/LoRA) and ``b [*batch, rank, out]`` = 0, both float32, so the adapted params equal the
base params bitwise at init. ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA).

Dropout. Standard LoRA computes ``h = W0 x + s * B A dropout(x)`` with an i.i.d. mask per
example, token and feature. A weight transform cannot depend on the example, so :func:`apply`
uses the closest weight-space equivalent: one inverted-dropout mask ``m`` over the *input
features* per adapted matrix (per layer of a stacked kernel), applied to the rows of ``A``:
``W = W0 + s * diag(m) A B``. Then ``x W = x W0 + s * (x * m) A B`` — exactly LoRA with input
dropout whose mask is shared by every example and token of the step (same marginal keep
probability and scaling, same expectation; masks are correlated across the batch, so the
regularisation noise does not average out over examples and the gradient is noisier). Masks
are independent across adapted kernels, as with one ``nn.Dropout`` per target in HF peft.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TARGETS = (r".*/attn/query/kernel$", r".*/attn/value/kernel$")
STACK_KEY = "layers"   # a path component holding nn.scan-stacked layers (leading layer axis)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Static LoRA metadata (a pytree without leaves, so it passes through ``jax.jit`` as is)."""
  rank: int
  alpha: float
  rslora: bool = False
  targets: tuple[str, ...] = DEFAULT_TARGETS

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


jax.tree_util.register_static(LoraSpec)


def path_str(path) -> str:
  """'/'-joined key path of a ``jax.tree_util`` leaf path (``encoder/layer_0/attn/query/kernel``)."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def split_dims(path: str, shape: Sequence[int]) -> tuple[int, int, int]:
  """``(batch_ndim, in_ndim, out_ndim)`` of a kernel ``[*batch, *in, *out]``.

  Rule: a path with a ``layers`` component is an ``nn.scan`` stack whose leading axis is a batch
  axis (one adapter per layer). Of the remaining dims, the attention output kernel
  (``.../out/kernel`` with 3 dims ``[heads, kv, embed]``) contracts the first two; every other
  DenseGeneral kernel contracts the first one (q/k/v ``[embed, heads, kv]``, 2-D ``[in, out]``,
  SwiGLU ``[embed, 2, mlp]``).
  """
  parts = path.split("/")
  batch = 1 if STACK_KEY in parts[:-1] else 0
  core = len(shape) - batch
  if core < 2:
    raise ValueError(f"LoRA target {path!r} with shape {tuple(shape)} is not a kernel "
                     f"(needs >= 2 non-stacked dims)")
  n_in = 2 if core == 3 and len(parts) >= 2 and parts[-2] == "out" else 1
  return batch, n_in, core - n_in


def _flat_shapes(shape, path) -> tuple[tuple[int, ...], int, int]:
  nb, ni, _ = split_dims(path, shape)
  batch = tuple(shape[:nb])
  return batch, int(np.prod(shape[nb:nb + ni])), int(np.prod(shape[nb + ni:]))


def _matched(params, targets: Sequence[str]) -> list[tuple[str, Any]]:
  pats = [re.compile(t) for t in targets]
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return [(path_str(p), x) for p, x in leaves if any(r.search(path_str(p)) for r in pats)]


def _nest(flat: dict[str, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = value
  return out


def _flatten_adapters(adapters) -> dict[str, dict[str, jax.Array]]:
  """``{kernel path: {'a': ..., 'b': ...}}``."""
  out: dict[str, dict[str, jax.Array]] = {}
  for p, x in jax.tree_util.tree_leaves_with_path(adapters):
    s = path_str(p)
    kernel_path, _, name = s.rpartition("/")
    out.setdefault(kernel_path, {})[name] = x
  return out


def init(params, targets: Sequence[str] = DEFAULT_TARGETS, rank: int = 8, alpha: float = 16.0,
         rng: jax.Array | None = None, rslora: bool = False) -> tuple[dict, LoraSpec]:
  """Adapters for every kernel matching a regex in ``targets`` -> ``(adapters, spec)``.

  ``adapters`` mirrors only the matched leaves of ``params``; each matched kernel becomes
  ``{'a', 'b'}``. Only shapes of ``params`` are read (works under ``jax.eval_shape``).
  ``rng`` defaults to ``PRNGKey(0)``.
  """
  if rank <= 0:
    raise ValueError(f"LoRA rank must be positive, got {rank}")
  matched = _matched(params, targets)
  if not matched:
    raise ValueError(f"LoRA targets {tuple(targets)} match no parameter")
  rng = jax.random.PRNGKey(0) if rng is None else rng
  flat = {}
  for i, (path, kernel) in enumerate(matched):
    batch, n_in, n_out = _flat_shapes(kernel.shape, path)
    bound = 1.0 / math.sqrt(n_in)
    a = jax.random.uniform(jax.random.fold_in(rng, i), (*batch, n_in, rank), jnp.float32, -bound, bound)
    flat[path] = {"a": a, "b": jnp.zeros((*batch, rank, n_out), jnp.float32)}
  return _nest(flat), LoraSpec(rank, float(alpha), rslora, tuple(targets))


def delta(kernel_shape: Sequence[int], path: str, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``scale * A @ B`` in float32, reshaped to ``kernel_shape``."""
  d = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  batch, n_in, n_out = _flat_shapes(kernel_shape, path)
  if d.shape != (*batch, n_in, n_out):
    raise ValueError(f"LoRA factors for {path!r} give {d.shape}, kernel {tuple(kernel_shape)} "
                     f"needs {(*batch, n_in, n_out)}")
  return (scale * d).reshape(tuple(kernel_shape))


def _transform(base_params, adapters, spec: LoraSpec, dropout_rate: float = 0.0,
               rng: jax.Array | None = None):
  flat = _flatten_adapters(adapters)
  order = {p: i for i, p in enumerate(sorted(flat))}
  if dropout_rate and rng is None:
    raise ValueError("LoRA dropout_rate > 0 needs an rng")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"LoRA dropout_rate must be in [0, 1), got {dropout_rate}")
  seen = set()

  def one(path, w):
    key = path_str(path)
    if key not in flat:
      return w
    seen.add(key)
    a, b = flat[key]["a"], flat[key]["b"]
    if dropout_rate:
      keep = 1.0 - dropout_rate
      mask = jax.random.bernoulli(jax.random.fold_in(rng, order[key]), keep, (*a.shape[:-1], 1))
      a = jnp.where(mask, a.astype(jnp.float32) / keep, 0.0)
    return (w.astype(jnp.float32) + delta(w.shape, key, a, b, spec.scale)).astype(w.dtype)

  out = jax.tree_util.tree_map_with_path(one, base_params)
  missing = set(flat) - seen
  if missing:
    raise ValueError(f"LoRA adapters for parameters not in the base tree: {sorted(missing)}")
  return out


def apply(base_params, adapters, spec: LoraSpec, *, dropout_rate: float = 0.0,
          rng: jax.Array | None = None):
  """Effective params ``W0 + scale * A @ B`` (float32 math, cast back to each kernel's dtype).

  Non-target leaves are returned as is. With ``b == 0`` every leaf equals the base bitwise.
  ``dropout_rate > 0`` (needs ``rng``) drops rows of ``A`` — per-input-feature dropout shared by
  the whole batch; see the module docstring for how this differs from per-example input dropout.
  Jit-friendly: ``spec`` is static; pass ``dropout_rate`` as a Python float.
  """
  return _transform(base_params, adapters, spec, dropout_rate, rng)


def merge(base_params, adapters, spec: LoraSpec):
  """Plain param tree with the adapters folded in (= :func:`apply` without dropout): same
  structure, shapes and dtypes as the base tree, so it saves as a normal checkpoint loadable by the
  unchanged model with no LoRA code."""
  return _transform(base_params, adapters, spec)


def count_params(adapters) -> int:
  """Number of scalars in the adapter tree (works on arrays and ``jax.ShapeDtypeStruct``)."""
  return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(adapters)))
