"""The interface between the one training loop and each pretraining objective.

The loop owns the optimizer, sharding, accumulation, checkpoints and logging; an objective owns
its model, its loss, its evaluation and its config fields. Objective state that is not trained by
gradients (EMA teachers, centers, queues) lives in ``extra`` and is sharded like the params it
mirrors.

Adding an objective: subclass :class:`Objective` in one module and declare on the class its short
``name`` (built-ins, see ``medfm_jax.objectives``), ``check_config`` (its own fields),
``image_encoders`` (where its checkpoints keep the image encoder) and ``image_text`` (has a text
tower for zero-shot); then write one config file. Nothing central changes.
"""
from __future__ import annotations

import abc
import functools
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medfm_jax.data import spec as data_spec
from medfm_jax.peft.lora import path_str

Metrics = dict[str, jax.Array]
# (encoder module, data config, init_from, encoder_weights) -> {param path: host array}: the image
# encoder of a checkpoint fitted to ``module`` (``train.restore.pretrained_encoder``). The trainer
# hands it in, as restoring checkpoints is the train layer's business.
EncoderLoader = Callable[[nn.Module, Any, str, str], dict[str, np.ndarray]]


class Objective(abc.ABC):
  """One pretraining objective. Methods are traced inside ``jit``; keep them pure."""

  # Short name of a built-in objective: the class in ``medfm_jax/objectives/<name>.py`` that
  # ``objective.name = '<name>'`` selects. Objectives outside the package are named by their import
  # path ('package.module:ClassName') instead and leave this empty.
  name: ClassVar[str] = ""
  # Where this objective's checkpoints keep an image encoder: tower name -> path in the saved train
  # state (``('params', ...)`` or ``('extra', ...)``); the first entry is the default tower
  # (``encoder_weights='default'``). Empty: its checkpoints have no encoder to evaluate or reuse.
  image_encoders: ClassVar[dict[str, tuple[str, ...]]] = {}
  # True for objectives with a text tower (``embed_split``, ``embed_texts``): their checkpoints
  # zero-shot classify (``python -m medfm_jax.evaluate`` protocol 'zero_shot').
  image_text: ClassVar[bool] = False
  # What ``python -m medfm_jax.export --format=hf`` writes for this objective's checkpoints: the
  # ``medfm_jax.interop`` family ('vitmae', 'dinov2', 'clip', 'flava') and the path of its params in
  # the saved train state (after :meth:`standalone_params`). None: not exportable.
  hf_export: ClassVar[tuple[str, tuple[str, ...]] | None] = None
  # Heads (top-level keys of the ``hf_export`` params) that a public model of that family may lack
  # (HF ``FlavaModel``) or hold in another shape (HF's MIM head predicts DALL-E codebook ids, the
  # run's may predict pixels): ``init_from`` leaves them at their fresh init, with one log line.
  hf_optional_heads: ClassVar[tuple[str, ...]] = ()
  # True: the trainer writes ``config.init_from`` (one of our checkpoints or a public HF model) into
  # the initial train state (``train.restore.init_from_values``: the whole model, or the source's
  # image encoder into every ``image_encoders`` path). False: the objective reads it itself.
  trainer_init_from: ClassVar[bool] = True

  def __init__(self, config, encoder_loader: EncoderLoader | None = None):
    """``objectives.build`` passes both; a subclass overriding ``__init__`` takes and forwards them."""
    self.config = config
    self._encoder_loader = encoder_loader

  @functools.cached_property
  def data(self) -> data_spec.DataSpec:
    """The run's ``config.data`` resolved (``data.spec.resolve``, shared with the trainer's
    pipelines): multi-crop, patch masks, tokenizer, MLM, mixing, splits."""
    return data_spec.resolve(self.config.data)

  @classmethod
  def standalone_params(cls, config, params):
    """``params`` with training-time transforms folded in (LoRA merged), as a plain model uses them.
    Default: unchanged."""
    del config
    return params

  @classmethod
  def check_config(cls, config) -> None:
    """Checks this objective's own fields (``config.objective.*`` and what it needs of the model and
    data); raises ``errors.ConfigError`` with one line naming the field. Runs in
    ``config.validate`` after the shared contract, before anything compiles, and in
    ``objectives.build``. Default: nothing to check."""
    del config

  def pretrained_encoder(self, module: nn.Module, init_from: str, weights: str = "default") -> dict:
    """``{param path: array}`` of the image encoder of checkpoint ``init_from`` fitted to
    ``module`` (apply with :func:`overwrite_params` in :meth:`init`), via the trainer's loader."""
    if self._encoder_loader is None:
      raise RuntimeError(f"init_from={init_from!r}: {type(self).__name__} was built without an "
                         "encoder loader; build it with train.assemble.build_objective")
    return self._encoder_loader(module, self.config.data, init_from, weights)

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: dict) -> tuple[Any, Any]:
    """-> (params boxed with ``nn.Partitioned`` logical names, extra state)."""

  @abc.abstractmethod
  def loss(self, params, extra, batch: dict, rng: jax.Array, step) -> tuple[jax.Array, tuple[Metrics, Any]]:
    """-> (scalar loss, (scalar metrics, new extra)). ``batch`` is one (micro)batch."""

  def after_update(self, params, extra, step):
    """Updates ``extra`` after the optimizer step (e.g. the EMA teacher). Default: unchanged."""
    del params, step
    return extra

  def trainable(self, params) -> Any | None:
    """Tree of bools marking trainable leaves, or None when everything trains."""
    del params
    return None

  def optimizer_kwargs(self) -> dict:
    """Extra keyword arguments for ``train.optim.make_optimizer`` (e.g. ``frozen_for_steps``)."""
    return {}

  def warnings(self, scalars: dict[str, float]) -> list[str]:
    """Host-side checks of logged training scalars (e.g. collapse); each string is logged."""
    del scalars
    return []

  def eval_metrics(self, params, extra, batch: dict, rng: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Held-out metrics as ``name -> (sum over valid rows, number of valid rows)``.

    ``batch['mask']`` marks real (non-padding) rows. Default: none.
    """
    del params, extra, batch, rng
    return {}

  def evaluate(self, params, extra, mesh, step: int) -> dict[str, float]:
    """Whole-dataset evaluations run at eval time (e.g. kNN on frozen features), called on every
    process inside the mesh context; returns scalars merged into the eval metrics. Default: none."""
    del params, extra, mesh, step
    return {}

  def eval_artifacts(self, params, extra, batch: dict, rng: jax.Array, workdir: str, step: int) -> None:
    """Writes eval images etc. Called on every process (it may run sharded computations);
    only process 0 may write files."""
    del params, extra, batch, rng, workdir, step


def masked_sum(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of per-row ``values`` over rows where ``mask``, number of such rows)."""
  mask = mask.astype(jnp.float32)
  return (values * mask).sum(), mask.sum()


def overwrite_params(boxed, values: dict):
  """Replaces the leaves of a boxed param tree whose path is in ``values`` (keeps the boxes)."""
  is_box = lambda x: isinstance(x, nn.Partitioned)

  def one(path, x):
    v = values.get(path_str(path))
    if v is None:
      return x
    return x.replace_boxed(jnp.asarray(v, jnp.float32)) if is_box(x) else jnp.asarray(v, jnp.float32)
  return jax.tree_util.tree_map_with_path(one, boxed, is_leaf=is_box)
