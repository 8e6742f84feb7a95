"""Tokenizers for captions: byte-level (no files, the default), Hugging Face ``tokenizer.json``
(``tokenizers`` package) and sentencepiece models (``sentencepiece`` package), supplied by path.

Every tokenizer exposes ``encode(text) -> list[int]`` (no special tokens), ``bos_id`` / ``eot_id``
(None when the tokenizer has none), ``pad_id`` and ``vocab_size``; for masked language modelling
also ``mask_id`` (None when the tokenizer has no mask token) and ``special_ids`` (ids that are
never masked nor drawn as random replacements). :func:`tokenize` turns texts into
``int32 [n, context_length]``: ``[bos] + body + [eot]`` padded with ``pad_id``; a text that is too
long loses the end of its body, never the EOT token.

:class:`CaptionTokenizer` is the picklable, lazily loading object the grain workers use: it holds
only the spec (kind, path, context length) and opens the tokenizer file in each worker process.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from medfm_jax import storage

KINDS = ("bytes", "hf", "sentencepiece")


class ByteTokenizer:
  """UTF-8 bytes: pad 0, byte ``v`` -> ``v + 1``, bos 257, eot 258 (largest id of a tokenized
  text, so CLIP's argmax pooling finds it); vocabulary 259. MLM adds mask 259: a model that reads
  masked texts needs a text vocabulary of 260 (``mlm_vocab_size``)."""
  pad_id, bos_id, eot_id, vocab_size = 0, 257, 258, 259
  mask_id = 259
  special_ids = (0, 257, 258, 259)

  def encode(self, text: str) -> list[int]:
    return [b + 1 for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(i - 1 for i in ids if 1 <= i <= 256).decode("utf-8", errors="replace")


# (bos, eot, pad) token strings of common tokenizer families, tried in order.
_SPECIAL_SETS = (("<|startoftext|>", "<|endoftext|>", None),      # CLIP BPE (pads with eot)
                 ("[CLS]", "[SEP]", "[PAD]"),                       # BERT / PubMedBERT WordPiece
                 ("<s>", "</s>", "<pad>"))                          # RoBERTa-style BPE


_MASK_TOKENS = ("[MASK]", "<mask>")


def _known(*ids) -> set[int]:
  return {i for i in ids if i is not None}


def mlm_vocab_size(tokenizer) -> int:
  """Vocabulary a model needs to read masked texts of ``tokenizer`` (its mask id included)."""
  return max(tokenizer.vocab_size, (tokenizer.mask_id or 0) + 1)


class HFTokenizer:
  """A Hugging Face ``tokenizer.json`` (any model type); special tokens found by name
  (CLIP ``<|startoftext|>``/``<|endoftext|>``, BERT ``[CLS]``/``[SEP]``/``[PAD]``, ``<s>``/``</s>``)."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer  # optional: the 'text' extra; pylint: disable=g-import-not-at-top
    if not storage.path(path).is_file():
      raise ValueError(f"data.tokenizer_path={path!r}: no such tokenizer.json file")
    try:
      self._tok = Tokenizer.from_str(storage.read_text(path))
    except Exception as e:  # pylint: disable=broad-except  (the Rust error type is not exported)
      raise ValueError(f"data.tokenizer_path={path!r}: not a Hugging Face tokenizer.json ({e})") from None
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = self.eot_id = None
    self.pad_id = 0
    for bos, eot, pad in _SPECIAL_SETS:
      if eot in vocab:
        self.bos_id, self.eot_id = vocab.get(bos), vocab[eot]
        self.pad_id = vocab[pad] if pad in vocab else (self.eot_id if pad is None else 0)
        break
    self.mask_id = next((vocab[m] for m in _MASK_TOKENS if m in vocab), None)
    added = self._tok.get_added_tokens_decoder()
    self.special_ids = tuple(sorted({i for i, t in added.items() if t.special}
                                    | _known(self.pad_id, self.bos_id, self.eot_id, self.mask_id)))

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)


class SentencePieceTokenizer:
  """A sentencepiece ``.model`` file; bos/eos/pad ids from the model (absent = -1 -> None / 0)."""

  def __init__(self, path: str):
    import sentencepiece as spm  # optional: the 'text' extra; pylint: disable=g-import-not-at-top
    if not storage.path(path).is_file():
      raise ValueError(f"data.tokenizer_path={path!r}: no such sentencepiece model file")
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=storage.path(path).read_bytes())
    except (RuntimeError, OSError) as e:
      raise ValueError(f"data.tokenizer_path={path!r}: not a sentencepiece model ({e})") from None
    self.vocab_size = int(self._sp.get_piece_size())
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eot_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
    ids = [self._sp.piece_to_id(m) for m in _MASK_TOKENS]
    self.mask_id = next((i for i in ids if not self._sp.is_unknown(i)), None)
    self.special_ids = tuple(sorted(
        {i for i in range(self.vocab_size) if self._sp.is_control(i) or self._sp.is_unknown(i)}
        | _known(self.pad_id, self.bos_id, self.eot_id, self.mask_id)))

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))


def load(kind: str, path: str = ""):
  """The tokenizer ``kind`` ('bytes' | 'hf' | 'sentencepiece'); files are given by ``path``."""
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "hf":
    return HFTokenizer(path)
  if kind == "sentencepiece":
    return SentencePieceTokenizer(path)
  raise ValueError(f"data.tokenizer={kind!r}: allowed {KINDS}")


def tokenize(tokenizer, texts: Sequence[str] | str, context_length: int) -> np.ndarray:
  """``texts`` -> ``int32 [n, context_length]``: ``[bos] body [eot] pad...``; over-long bodies are
  cut so that bos and eot always fit."""
  if isinstance(texts, str):
    texts = [texts]
  specials = [t for t in (tokenizer.bos_id, tokenizer.eot_id) if t is not None]
  room = context_length - len(specials)
  if room < 1:
    raise ValueError(f"data.context_length={context_length}: too short for the tokenizer's "
                     f"{len(specials)} special tokens plus one token of text")
  out = np.full((len(texts), context_length), tokenizer.pad_id, np.int32)
  for i, text in enumerate(texts):
    ids = tokenizer.encode(text)[:room]
    if tokenizer.bos_id is not None:
      ids = [tokenizer.bos_id] + ids
    if tokenizer.eot_id is not None:
      ids = ids + [tokenizer.eot_id]
    out[i, :len(ids)] = ids
  return out


@dataclasses.dataclass(frozen=True)
class CaptionTokenizer:
  """Picklable caption -> ``int32 [context_length]`` tokens, for grain transforms; the tokenizer
  file is opened lazily in each process that uses it."""
  kind: str = "bytes"
  path: str = ""
  context_length: int = 77

  def tokenizer(self):
    cache = _CACHE.get(self)
    if cache is None:
      cache = _CACHE[self] = load(self.kind, self.path)
    return cache

  def __call__(self, caption: str) -> np.ndarray:
    return tokenize(self.tokenizer(), [caption], self.context_length)[0]

  @property
  def pad_id(self) -> int:
    return self.tokenizer().pad_id

  @property
  def mask_id(self) -> int | None:
    return self.tokenizer().mask_id

  @property
  def eot_id(self) -> int:
    """The EOT id (the last id of a text without one, for pooling that looks for it: -1)."""
    eot = self.tokenizer().eot_id
    return -1 if eot is None else eot


_CACHE: dict[CaptionTokenizer, object] = {}


def from_config(data_cfg) -> CaptionTokenizer | None:
  """``data.tokenizer`` / ``data.tokenizer_path`` / ``data.context_length`` -> CaptionTokenizer;
  None when the config has no ``data.tokenizer`` (image-only objectives)."""
  kind = data_cfg.get("tokenizer") if hasattr(data_cfg, "get") else None
  if not kind:
    return None
  if kind not in KINDS:
    raise ValueError(f"data.tokenizer={kind!r}: allowed {KINDS}")
  path = data_cfg.get("tokenizer_path", "")
  if kind != "bytes" and not path:
    raise ValueError(f"data.tokenizer={kind!r} needs data.tokenizer_path (a "
                     f"{'tokenizer.json' if kind == 'hf' else 'sentencepiece .model'} file)")
  return CaptionTokenizer(kind, path, int(data_cfg.get("context_length", 77)))
