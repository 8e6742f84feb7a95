"""Tokenizers: byte-level, HF tokenizer.json, sentencepiece; padding/truncation; tokens from the grain pipeline."""
import pickle

import numpy as np
import pytest

from medfm_jax.data import phantoms, pipeline, tokenizers
from tests import helpers

CAPTIONS = [phantoms.PhantomSource("train", 16)[i]["caption"] for i in range(40)]


def test_byte_tokenizer_pads_truncates_and_keeps_eot():
  tok = tokenizers.ByteTokenizer()
  out = tokenizers.tokenize(tok, ["héllo", "x" * 50], 12)
  assert out.dtype == np.int32 and out.shape == (2, 12)
  assert tok.decode(out[0]) == "héllo"
  np.testing.assert_array_equal(out[0, :8], [257, *[b + 1 for b in "héllo".encode()], 258])
  assert (out[0, 8:] == 0).all()
  assert out[1, 0] == 257 and out[1, -1] == 258 and (out[1, 1:-1] == ord("x") + 1).all()
  with pytest.raises(ValueError, match="data.context_length"):
    tokenizers.tokenize(tok, ["a"], 2)


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(CAPTIONS, trainers.WordLevelTrainer(
      special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  tok.save(path)
  return path


def test_hf_tokenizer_json(hf_json):
  tok = tokenizers.load("hf", hf_json)
  assert (tok.pad_id, tok.bos_id, tok.eot_id) == (0, 2, 3)
  out = tokenizers.tokenize(tok, ["Chest X-ray with no focal finding.", "Brain MRI " * 20], 8)
  words = ["Chest", "X", "-", "ray", "with", "no"]
  assert list(out[0]) == [2] + [tok._tok.token_to_id(w) for w in words] + [3]   # cut, EOT kept
  assert out[1, -1] == 3


def test_sentencepiece(tmp_path):
  import sentencepiece as spm
  prefix = str(tmp_path / "sp")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS * 5), model_prefix=prefix,
                                 vocab_size=60, pad_id=0, unk_id=1, bos_id=2, eos_id=3)
  tok = tokenizers.load("sentencepiece", prefix + ".model")
  assert (tok.pad_id, tok.bos_id, tok.eot_id, tok.vocab_size) == (0, 2, 3, 60)
  out = tokenizers.tokenize(tok, [CAPTIONS[0]], 64)[0]
  body = out[1:list(out).index(3)]
  assert out[0] == 2 and tok._sp.decode(body.tolist()) == CAPTIONS[0]


def test_bad_tokenizer_fields(tmp_path):
  with pytest.raises(ValueError, match="data.tokenizer_path"):
    tokenizers.load("hf", str(tmp_path / "missing.json"))
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(ValueError, match="data.tokenizer_path"):
    tokenizers.load("hf", str(tmp_path / "bad.json"))
  with pytest.raises(ValueError, match="data.tokenizer="):
    tokenizers.from_config({"tokenizer": "bpe"})
  with pytest.raises(ValueError, match="data.tokenizer_path"):
    tokenizers.from_config({"tokenizer": "sentencepiece"})


def test_pipeline_tokens_from_captions():
  c = helpers.tiny_clip_config()
  spec = tokenizers.from_config(c.data)
  assert pickle.loads(pickle.dumps(spec)) == spec          # grain workers receive the spec
  batch = next(pipeline.make_train_iterator(c.data, 4, seed=0))
  assert batch["tokens"].shape == (4, c.data.context_length) and batch["tokens"].dtype == np.int32
  decoded = [tokenizers.ByteTokenizer().decode(t) for t in batch["tokens"]]
  assert all(d.endswith(".") and any(m in d for m in phantoms.MODALITY_NAMES.values()) for d in decoded)
  ev = next(iter(pipeline.make_eval_batches(c.data, "val", 8, 5)))
  assert [tokenizers.ByteTokenizer().decode(t) for t in ev["tokens"][:5]] == \
      [pipeline.make_source(c.data, "val")[i]["caption"] for i in range(5)]
  assert (ev["tokens"][5:] == 0).all() and not ev["mask"][5:].any()


def test_records_without_captions_fail_clearly():
  class _NoCaptions:
    def __len__(self):
      return 4

    def __getitem__(self, i):
      return {"image": np.zeros((16, 16, 1), np.uint8), "modality": 0, "finding": 0, "index": i}

  c = helpers.tiny_clip_config()
  with pytest.raises(Exception, match="data.tokenizer is set but the record has no 'caption'"):
    next(pipeline.make_train_iterator(c.data, 2, seed=0, source=_NoCaptions()))
