"""Data: the embedded corpus, token files, bad files with clear errors, the resumable iterator."""

import numpy as np
import pytest

from mla_jax.config import default_config
from mla_jax.data import BatchIterator, ByteTokenizer, eval_batches, load_corpus
from mla_jax.data.sources import stdlib_files
from mla_jax.errors import DataError


def _data_cfg(corpus, fmt="auto", val_fraction=0.1):
  d = default_config().data
  d.corpus, d.format, d.val_fraction = corpus, fmt, val_fraction
  return d


def test_stdlib_corpus_is_real_text_with_a_file_split():
  cfg = _data_cfg("stdlib", val_fraction=0.05)
  cfg.max_bytes = 2_000_000
  a = load_corpus(cfg, ByteTokenizer())
  b = load_corpus(cfg, ByteTokenizer())
  assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)  # deterministic
  assert len(a.train) > 1_000_000 and len(a.val) > 10_000
  text = ByteTokenizer().decode(a.train[:20000])
  assert "def " in text and "import" in text
  assert ByteTokenizer.eos_id in set(a.train[:200000].tolist())  # documents are separated
  assert len(stdlib_files()) > 100


def test_byte_tokenizer_round_trip():
  tok = ByteTokenizer()
  assert tok.decode(tok.encode("héllo ∑")) == "héllo ∑"


@pytest.mark.parametrize("fmt,dtype", [("uint32", "<u4"), ("uint16", "<u2")])
def test_token_files(tmp_path, fmt, dtype):
  ids = (np.arange(1000) % 200).astype(dtype)
  path = tmp_path / ("data.bin" if fmt == "uint32" else "data.u16")
  ids.tofile(path)
  corpus = load_corpus(_data_cfg(str(path)), ByteTokenizer())  # format from the extension
  assert np.array_equal(np.concatenate([corpus.train, corpus.val]), ids.astype(np.uint32))
  assert len(corpus.val) == 100


def test_text_file_and_folder(tmp_path):
  (tmp_path / "a.txt").write_text("hello world " * 100)
  corpus = load_corpus(_data_cfg(str(tmp_path / "a.txt")), ByteTokenizer())
  assert ByteTokenizer().decode(corpus.train[:11]) == "hello world"
  for i in range(4):
    (tmp_path / f"doc{i}.md").write_text(f"document {i} " * 50)
  corpus = load_corpus(_data_cfg(str(tmp_path)), ByteTokenizer())
  assert len(corpus.train) > 0 and len(corpus.val) > 0


def test_max_bytes_counts_utf8_bytes(tmp_path):
  for i in range(4):  # 100 characters, 200 bytes each
    (tmp_path / f"{i}.txt").write_text("é" * 100, encoding="utf-8")
  cfg = _data_cfg(str(tmp_path), val_fraction=0.0)
  cfg.max_bytes = 450  # room for 4 files counted in characters, for 2 counted in bytes
  corpus = load_corpus(cfg, ByteTokenizer())
  assert len(corpus.train) == 2 * (200 + 1)  # two files of 200 byte tokens, each ended by the EOS token


def test_hf_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models, pre_tokenizers

  vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  cfg = _data_cfg(str(tmp_path / "t.txt"))
  (tmp_path / "t.txt").write_text("hello world " * 40)
  from mla_jax.data import load_tokenizer

  hf = load_tokenizer(str(path))
  assert hf.vocab_size == 4 and hf.eos_id == 0
  corpus = load_corpus(cfg, hf)
  assert corpus.train[:4].tolist() == [2, 3, 2, 3]


def test_bad_data_files_name_the_file(tmp_path):
  missing = tmp_path / "nope.bin"
  with pytest.raises(DataError, match=f"{missing}: data path not found"):
    load_corpus(_data_cfg(str(missing)), ByteTokenizer())
  empty = tmp_path / "empty.bin"
  empty.write_bytes(b"")
  with pytest.raises(DataError, match=f"{empty}: token file is empty"):
    load_corpus(_data_cfg(str(empty)), ByteTokenizer())
  odd = tmp_path / "odd.bin"
  odd.write_bytes(b"\x01\x00\x00\x00\x02\x00")
  with pytest.raises(DataError, match=f"{odd}: size 6 bytes is not a multiple of 4"):
    load_corpus(_data_cfg(str(odd)), ByteTokenizer())
  big = tmp_path / "big.bin"
  np.array([1, 2, 100000, 3], "<u4").tofile(big)
  with pytest.raises(DataError, match=f"{big}: token id 100000 at position 2 is outside the vocabulary"):
    load_corpus(_data_cfg(str(big)), ByteTokenizer())
  # the model's vocabulary, when set, is the limit instead of the tokenizer's
  assert load_corpus(_data_cfg(str(big)), ByteTokenizer(), vocab_size=128354).train[2] == 100000
  empty_txt = tmp_path / "empty.txt"
  empty_txt.write_text("")
  with pytest.raises(DataError, match=f"{empty_txt}: text file is empty"):
    load_corpus(_data_cfg(str(empty_txt)), ByteTokenizer())
  binary = tmp_path / "image.dat"
  binary.write_bytes(bytes([0xFF, 0xFE, 0x00, 0x81]) * 10)
  with pytest.raises(DataError, match=f"{binary}: not UTF-8 text"):
    load_corpus(_data_cfg(str(binary)), ByteTokenizer())
  small = np.arange(50, dtype=np.uint32)
  with pytest.raises(DataError, match="small.bin: 50 training tokens are too few for one batch of 4 x 16"):
    BatchIterator(small, 4, 16, 0, "small.bin")
  with pytest.raises(DataError, match="too few for one evaluation batch"):
    eval_batches(small, 4, 16, 2)


def test_iterator_is_seeded_resumable_and_covers_an_epoch():
  tokens = np.arange(16 * 10 + 1, dtype=np.uint32)
  it = BatchIterator(tokens, 2, 16, seed=3)
  batches = [next(it) for _ in range(7)]
  resumed = BatchIterator(tokens, 2, 16, seed=3)
  resumed.set_state({"step": 4})
  for i in range(4, 7):
    b = next(resumed)
    assert np.array_equal(b["inputs"], batches[i]["inputs"])
  firsts = sorted(int(b["inputs"][r, 0]) for b in batches[:5] for r in range(2))
  assert firsts == [16 * w for w in range(10)]  # one epoch = every window exactly once
  assert np.array_equal(batches[0]["targets"][:, :-1], batches[0]["inputs"][:, 1:])
  other = BatchIterator(tokens, 2, 16, seed=4)
  assert not all(np.array_equal(next(other)["inputs"], b["inputs"]) for b in batches[:3])
  # two processes each build half of the same global batch
  halves = [BatchIterator(tokens, 2, 16, 3, process_index=i, process_count=2).batch_at(5)["inputs"] for i in (0, 1)]
  assert np.array_equal(np.concatenate(halves), batches[5]["inputs"])
