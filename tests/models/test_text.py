"""Text transformer: causal masking, padding mask, pooling rules, scan == unrolled."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfm_jax.data import tokenizers
from medfm_jax.models import layers, text, vit
from medfm_jax.parallel import programs

BYTES = tokenizers.ByteTokenizer()


def _model(**kw):
  args = dict(width=32, depth=2, num_heads=2, mlp_dim=64, context_length=24, vocab_size=259,
              eot_id=BYTES.eot_id, pad_id=BYTES.pad_id)
  return text.TextTransformer(**(args | kw))


def _tokens(*texts):
  return jnp.asarray(tokenizers.tokenize(BYTES, list(texts), 24))


@pytest.fixture(scope="module")
def causal():
  model = _model(causal=True, pooling="eot")
  return model, programs.jit_once(model.init)(jax.random.PRNGKey(0), _tokens("a"))["params"]   # one compile


@pytest.mark.slow
def test_causal_outputs_ignore_later_tokens(causal):
  model, params = causal
  a, b = _tokens("a small lesion", "a small cyst!!")   # equal up to position 9 (bos + 8 bytes)
  _, xa = model.apply({"params": params}, a[None], return_tokens=True)
  _, xb = model.apply({"params": params}, b[None], return_tokens=True)
  np.testing.assert_allclose(xa[0, :9], xb[0, :9], atol=1e-6)
  assert np.abs(xa[0, 9:] - xb[0, 9:]).max() > 1e-3
  bidir = _model(causal=False, pooling="cls")
  p = programs.jit_once(bidir.init)(jax.random.PRNGKey(0), a[None])["params"]
  _, ya = bidir.apply({"params": p}, a[None], return_tokens=True)
  _, yb = bidir.apply({"params": p}, b[None], return_tokens=True)
  assert np.abs(ya[0, :9] - yb[0, :9]).max() > 1e-4


@pytest.mark.slow
def test_padding_keys_masked_for_bidirectional():
  model = _model(causal=False, pooling="mean")
  tok = _tokens("ct with a lesion")
  params = programs.jit_once(model.init)(jax.random.PRNGKey(1), tok)["params"]
  garbage = np.asarray(tok).copy()
  n = int((garbage != BYTES.pad_id).sum())
  shorter = jnp.asarray(garbage[:, :n + 3])      # same text, less padding
  full = model.apply({"params": params}, tok)
  np.testing.assert_allclose(model.apply({"params": params}, shorter), full, atol=1e-5)
  unmasked = _model(causal=False, pooling="mean", mask_padding=False)
  assert np.abs(unmasked.apply({"params": params}, shorter) - unmasked.apply({"params": params}, tok)).max() > 1e-4


@pytest.mark.slow
def test_pooling_positions(causal):
  model, params = causal
  tok = _tokens("abc", "a longer caption")
  pooled, x = model.apply({"params": params}, tok, return_tokens=True)
  eot = [int(np.flatnonzero(np.asarray(t) == BYTES.eot_id)[0]) for t in tok]
  np.testing.assert_allclose(pooled, np.stack([x[i, e] for i, e in enumerate(eot)]), atol=1e-6)
  # The byte tokenizer's EOT is its largest id: CLIP's argmax rule picks the same position.
  argmax = _model(causal=True, pooling="argmax")
  np.testing.assert_allclose(argmax.apply({"params": params}, tok), pooled, atol=1e-6)
  for pooling, want in (("cls", x[:, 0]), ("last", x[:, -1])):
    np.testing.assert_allclose(_model(pooling=pooling).apply({"params": params}, tok), want, atol=1e-6)


@pytest.mark.slow
def test_scan_matches_unrolled(causal):
  model, params = causal
  tok = _tokens("mri with calcifications", "x")
  scanned = _model(causal=True, pooling="eot", scan=True, remat="full")
  stacked = vit.stack_layers(nn.unbox(params))
  np.testing.assert_allclose(scanned.apply({"params": stacked}, tok), model.apply({"params": params}, tok),
                             atol=1e-5)


def test_variants():
  sizes = lambda v: dataclasses.astuple(text.VARIANTS[v])[:6]
  assert sizes("clip_b16") == (512, 12, 8, 2048, 77, 49408) and text.VARIANTS["clip_b16"].causal
  assert sizes("biomedclip") == (768, 12, 12, 3072, 256, 30522) and not text.VARIANTS["biomedclip"].causal
  with pytest.raises(ValueError, match="model.text.pooling"):
    jax.eval_shape(_model(pooling="max").init, jax.random.PRNGKey(0), _tokens("a"))


@pytest.mark.slow
def test_bert_layout_tower():
  """``post_ln`` + ``embed_norm`` + ``pooler``: BERT's params (no final norm; a pooler), each block
  ``ln(x + f(x))`` (checked by hand on the first block), scanned == unrolled."""
  model = _model(causal=False, pooling="cls", post_ln=True, embed_norm=True, pooler=True, depth=1)
  tok = _tokens("mri with calcifications", "x")
  params = nn.unbox(programs.jit_once(model.init)(jax.random.PRNGKey(0), tok)["params"])
  rng = np.random.default_rng(1)   # numpy: a jax.random draw compiles a program per shape
  params = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape, np.float32), params)
  assert "norm" not in params and set(params["pooler"]) == {"kernel", "bias"}
  pooled, hidden = model.apply({"params": params}, tok, return_tokens=True)
  ln = lambda p, y: (y - y.mean(-1, keepdims=True)) / jnp.sqrt(y.var(-1, keepdims=True) + 1e-5) * p["scale"] + p["bias"]
  emb = ln(params["embed_norm"], jnp.take(params["token_embed"], tok, axis=0) + params["pos_embed"][None, :tok.shape[1]])
  block = params["encoder"]["layer_0"]
  mask = (tok != BYTES.pad_id)[:, None, None, :]
  y = ln(block["norm1"], emb + layers.Attention(2).apply({"params": block["attn"]}, emb, mask=mask))
  y = ln(block["norm2"], y + layers.Mlp(64, "quick_gelu").apply({"params": block["mlp"]}, y))
  np.testing.assert_allclose(hidden, y, atol=2e-5)
  np.testing.assert_allclose(pooled, jnp.tanh(hidden[:, 0] @ params["pooler"]["kernel"] + params["pooler"]["bias"]),
                             atol=2e-5)
  scanned = _model(causal=False, pooling="cls", post_ln=True, embed_norm=True, pooler=True, depth=1, scan=True)
  np.testing.assert_allclose(scanned.apply({"params": vit.stack_layers(params)}, tok), pooled, atol=1e-5)
