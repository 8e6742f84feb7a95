r"""Trainable parameters and optimizer-state bytes per fine-tuning scheme, from shapes only
(``jax.eval_shape``: nothing is allocated, so ViT-B/16 and larger are measured on a laptop).

  python -m medfm_jax.train.budget --config=configs/eval/finetune.py:vit_b16

prints a Markdown table for full / last-N / linear probe / LoRA / prompt / adapter fine-tuning of
the config's classifier, using the optimizer the shared trainer builds (frozen leaves hold no
optimizer state).
"""
from __future__ import annotations

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from medfm_jax.train import assemble

# scheme -> config overrides that enable it
SCHEMES = {
    "full": {},
    "last_n": {"objective.last_n": 2},
    "linear_probe": {},
    "lora": {},
    "prompt": {"model.num_prompts": 10},
    "adapter": {"model.adapter_dim": 64},
}


def tree_bytes(tree) -> int:
  """Bytes of all array leaves (arrays or ``jax.ShapeDtypeStruct``)."""
  return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _set(config, key: str, value) -> None:
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def measure(config) -> dict:
  """``{total_params, trainable_params, opt_state_bytes}`` of ``config``'s supervised objective
  with the trainer's optimizer (``train.assemble.build_objective``)."""
  objective, tx = assemble.build_objective(config)
  d = config.data
  batch = {"image": jax.ShapeDtypeStruct((1, d.image_size, d.image_size, d.channels), jnp.float32)}
  params = jax.eval_shape(lambda r, b: nn.unbox(objective.init(r, b)[0]), jax.random.PRNGKey(0), batch)
  opt_state = jax.eval_shape(tx.init, params)
  mask = objective.trainable(params)
  sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
  return {"total_params": sum(sizes),
          "trainable_params": sum(s for s, t in zip(sizes, jax.tree.leaves(mask)) if t),
          "opt_state_bytes": tree_bytes(opt_state)}


def scheme_table(config, schemes=tuple(SCHEMES)) -> dict[str, dict]:
  """:func:`measure` for each scheme (``objective.scheme`` + :data:`SCHEMES` overrides)."""
  out = {}
  for name in schemes:
    c = copy.deepcopy(config)
    with c.unlocked():
      c.objective.scheme = name
      for k, v in SCHEMES[name].items():
        _set(c, k, v)
    out[name] = measure(c)
  return out


def markdown(table: dict[str, dict]) -> str:
  full = table["full"]["opt_state_bytes"]
  lines = ["| scheme | trainable params | optimizer state | % of full |", "|---|---|---|---|"]
  for name, r in table.items():
    lines.append(f"| {name} | {r['trainable_params']:,} | {r['opt_state_bytes'] / 2**20:.2f} MiB | "
                 f"{100 * r['opt_state_bytes'] / full:.2f}% |")
  return "\n".join(lines)


def main(argv):
  del argv
  c = flags.FLAGS.config
  print(f"model {c.model.variant} at {c.data.image_size}px, {c.data.channels} channels, "
        f"label {c.data.label}; LoRA r={c.objective.lora_rank} on {list(c.objective.lora_targets)}")
  print(markdown(scheme_table(c)))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Fine-tune config, e.g. configs/eval/finetune.py:vit_b16.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
