"""Frozen leaves hold no optimizer state, get no update and no weight decay; LoRA r=8 keeps under
2% of full fine-tuning's optimizer state (same ratio logic as ViT-B/16, on a small model)."""
import jax
import jax.numpy as jnp
import numpy as np

from medfm_jax.train import budget
from medfm_jax.train import optim
from tests import helpers


def _config(**kw):
  # width 192 (ViT-Ti), 2 blocks: LoRA r=8 on q/v is ~32 d / (12 d^2) of a block, as for ViT-B.
  return helpers.tiny_eval_config("finetune", "full", **dict({"model.variant": "Ti/4", "model.depth": 2}, **kw))


def test_lora_optimizer_state_under_two_percent_of_full():
  table = budget.scheme_table(_config(), ("full", "lora", "linear_probe", "prompt", "adapter"))
  full, lora = table["full"], table["lora"]
  assert lora["opt_state_bytes"] < 0.02 * full["opt_state_bytes"]
  for name, r in table.items():
    # Adam: two float32 moments per trainable scalar, plus a few int32 step counters; nothing for
    # frozen leaves.
    assert 8 * r["trainable_params"] <= r["opt_state_bytes"] <= 8 * r["trainable_params"] + 64, name
  assert table["linear_probe"]["trainable_params"] == 192 * 6 + 6
  assert table["prompt"]["trainable_params"] == 10 * 192 + 192 * 6 + 6
  assert "| lora |" in budget.markdown(table)


def test_frozen_leaves_get_no_update_and_no_weight_decay():
  c = helpers.tiny_eval_config("finetune", "full", weight_decay=0.5, warmup_steps=0)
  params = {"frozen": {"kernel": jnp.ones((4, 4))}, "head": {"kernel": jnp.ones((4, 2))}}
  tx = optim.make_optimizer(c, lambda p: {"frozen": {"kernel": False}, "head": {"kernel": True}})
  state = tx.init(params)
  assert budget.tree_bytes(state) <= 8 * 8 + 64       # moments only for the 8 head scalars
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    assert np.all(np.asarray(updates["frozen"]["kernel"]) == 0)
    assert np.all(np.asarray(updates["head"]["kernel"]) != 0)
