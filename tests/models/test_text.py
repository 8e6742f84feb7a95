"""Text transformer: causal masking, padding mask, pooling rules, scan == unrolled.

Params come from helpers.random_params (numpy, nothing to compile); forwards run as one jitted
program per model and shape (eager, every op compiles on its own)."""
import dataclasses
import functools

import jax
import numpy as np
import pytest

from medfm_jax.data import tokenizers
from medfm_jax.models import layers, text, vit
from tests.helpers import random_params

BYTES = tokenizers.ByteTokenizer()


@functools.partial(jax.jit, static_argnums=0, static_argnames="return_tokens")
def _apply(model, params, *args, **kwargs):
  return model.apply({"params": params}, *args, **kwargs)


def _params(model, tokens, seed=0, std=0.05):
  return random_params(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"], seed, std)


def _model(**kw):
  args = dict(width=32, depth=2, num_heads=2, mlp_dim=64, context_length=24, vocab_size=259,
              eot_id=BYTES.eot_id, pad_id=BYTES.pad_id)
  return text.TextTransformer(**(args | kw))


def _tokens(*texts):
  return np.asarray(tokenizers.tokenize(BYTES, list(texts), 24))


@pytest.fixture(scope="module")
def causal():
  model = _model(causal=True, pooling="eot")
  return model, _params(model, _tokens("a"))


@pytest.mark.slow
def test_causal_outputs_ignore_later_tokens(causal):
  model, params = causal
  a, b = _tokens("a small lesion", "a small cyst!!")   # equal up to position 9 (bos + 8 bytes)
  _, xa = _apply(model, params, a[None], return_tokens=True)
  _, xb = _apply(model, params, b[None], return_tokens=True)
  np.testing.assert_allclose(xa[0, :9], xb[0, :9], atol=1e-6)
  assert np.abs(xa[0, 9:] - xb[0, 9:]).max() > 1e-3
  bidir = _model(causal=False, pooling="cls")
  p = _params(bidir, a[None])
  _, ya = _apply(bidir, p, a[None], return_tokens=True)
  _, yb = _apply(bidir, p, b[None], return_tokens=True)
  assert np.abs(ya[0, :9] - yb[0, :9]).max() > 1e-4


@pytest.mark.slow
def test_padding_keys_masked_for_bidirectional():
  model = _model(causal=False, pooling="mean")
  tok = _tokens("ct with a lesion")
  params = _params(model, tok, seed=1)
  n = int((tok != BYTES.pad_id).sum())
  shorter = tok[:, :n + 3]                       # same text, less padding
  full = _apply(model, params, tok)
  np.testing.assert_allclose(_apply(model, params, shorter), full, atol=1e-5)
  unmasked = _model(causal=False, pooling="mean", mask_padding=False)
  assert np.abs(_apply(unmasked, params, shorter) - _apply(unmasked, params, tok)).max() > 1e-4


@pytest.mark.slow
def test_pooling_positions(causal):
  model, params = causal
  tok = _tokens("abc", "a longer caption")
  # One program for the four poolings: XLA merges the tower they share (four programs: 4x the compile).
  out = jax.jit(lambda p, t: {pooling: model.clone(pooling=pooling).apply({"params": p}, t, return_tokens=True)
                              for pooling in ("eot", "argmax", "cls", "last")})(params, tok)
  pooled, x = np.asarray(out["eot"][0]), np.asarray(out["eot"][1])
  eot = [int(np.flatnonzero(t == BYTES.eot_id)[0]) for t in tok]
  np.testing.assert_allclose(pooled, np.stack([x[i, e] for i, e in enumerate(eot)]), atol=1e-6)
  # The byte tokenizer's EOT is its largest id: CLIP's argmax rule picks the same position.
  np.testing.assert_allclose(out["argmax"][0], pooled, atol=1e-6)
  for pooling, want in (("cls", x[:, 0]), ("last", x[:, -1])):
    np.testing.assert_allclose(out[pooling][0], want, atol=1e-6)


@pytest.mark.slow
def test_scan_matches_unrolled(causal):
  model, params = causal
  tok = _tokens("mri with calcifications", "x")
  scanned = _model(causal=True, pooling="eot", scan=True, remat="full")
  stacked = vit.stack_layers(params)
  np.testing.assert_allclose(_apply(scanned, stacked, tok), _apply(model, params, tok), atol=1e-5)


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
  params = _params(model, tok, seed=1, std=0.2)   # about the init's scale (+ 0.1 noise) it replaces
  assert "norm" not in params and set(params["pooler"]) == {"kernel", "bias"}
  pooled, hidden = _apply(model, params, tok, return_tokens=True)
  ln = lambda p, y: (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5) * p["scale"] + p["bias"]
  emb = ln(params["embed_norm"], params["token_embed"][tok] + params["pos_embed"][None, :tok.shape[1]])
  block = params["encoder"]["layer_0"]
  mask = (tok != BYTES.pad_id)[:, None, None, :]
  y = ln(block["norm1"], emb + np.asarray(_apply(layers.Attention(2), block["attn"], emb, mask=mask)))
  y = ln(block["norm2"], y + np.asarray(_apply(layers.Mlp(64, "quick_gelu"), block["mlp"], y)))
  np.testing.assert_allclose(hidden, y, atol=2e-5)
  np.testing.assert_allclose(pooled, np.tanh(np.asarray(hidden)[:, 0] @ params["pooler"]["kernel"]
                                             + params["pooler"]["bias"]), atol=2e-5)
  scanned = _model(causal=False, pooling="cls", post_ln=True, embed_norm=True, pooler=True, depth=1, scan=True)
  np.testing.assert_allclose(_apply(scanned, vit.stack_layers(params), tok), pooled, atol=1e-5)
