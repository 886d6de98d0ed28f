"""Text datasets: JSON lines, gzip, folders and parquet, the token cache, bad records, the token dtype."""

import gzip
import io
import json
import re
import sys

import numpy as np
import pytest

from mla_jax.config import default_config
from mla_jax.data import ByteTokenizer, load_corpus, load_tokenizer, text
from mla_jax.errors import DataError

DOCS = [f"document {i}: " + "words and more words " * (i + 1) for i in range(12)]


def _data_cfg(corpus, val_fraction=0.2, text_field="text"):
  d = default_config().data
  d.corpus, d.val_fraction, d.text_field = str(corpus), val_fraction, text_field
  return d


class CountingTokenizer(ByteTokenizer):
  """Bytes, counting the documents it is asked to encode."""

  def __init__(self):
    self.calls = 0

  def encode_batch(self, texts):
    self.calls += len(texts)
    return super().encode_batch(texts)


def _write_jsonl(path, docs, field="text"):
  lines = "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs))
  if str(path).endswith(".gz"):
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(lines)
  else:
    path.write_text(lines, encoding="utf-8")


def _write_parquet(path, docs, field="text"):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq

  pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=5)


def _expected(docs):
  tok = ByteTokenizer()
  return np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in docs])


def _load(cfg, tokenizer=None):
  stream = io.StringIO()
  return load_corpus(cfg, tokenizer or ByteTokenizer(), stream=stream), stream.getvalue()


@pytest.mark.parametrize("layout", ["jsonl", "jsonl.gz", "folder", "parquet"])
def test_record_datasets(tmp_path, layout):
  data = tmp_path / "data"
  data.mkdir()
  if layout == "folder":  # two shards, in name order, beside files that are not records
    _write_jsonl(data / "part-0.jsonl", DOCS[:7], field="content")
    _write_jsonl(data / "part-1.jsonl.gz", DOCS[7:], field="content")
    (data / "README.md").write_text("a dataset card, not a document")
    corpus_path, field = data, "content"
  elif layout == "parquet":
    corpus_path, field = data / "train.parquet", "text"
    _write_parquet(corpus_path, DOCS)
  else:
    corpus_path, field = data / f"train.{layout}", "text"
    _write_jsonl(corpus_path, DOCS)
  corpus, log = _load(_data_cfg(corpus_path, text_field=field))
  tokens = np.concatenate([corpus.train, corpus.val])
  assert np.array_equal(tokens, _expected(DOCS))
  assert corpus.train.dtype == np.uint16 and "tokenizing" in log
  # the held-out tail starts at a document and holds about val_fraction of the tokens
  assert corpus.val[0] == ord("d") and corpus.train[-1] == ByteTokenizer.eos_id
  assert 0.1 < len(corpus.val) / len(tokens) <= 0.3
  assert corpus.train_offsets[0] == 0 and corpus.train_offsets[-1] == len(corpus.train)
  assert corpus.val_offsets[-1] == len(corpus.val)
  assert len(corpus.train_offsets) - 1 + len(corpus.val_offsets) - 1 == len(DOCS)
  ends = corpus.train_offsets[1:] - 1
  assert (corpus.train[ends] == ByteTokenizer.eos_id).all()
  assert f"{len(DOCS)} documents" in corpus.description


def test_cache_is_reused_and_follows_its_sources(tmp_path):
  path = tmp_path / "train.jsonl"
  _write_jsonl(path, DOCS)
  tok = CountingTokenizer()
  first, _ = _load(_data_cfg(path), tok)
  assert tok.calls == len(DOCS)
  cache = sorted(p.name for p in (tmp_path / text.CACHE_DIR_NAME).iterdir())
  assert [n.split(".")[-1] for n in cache] == ["json", "npy", "u16"] and not any("tmp" in n for n in cache)
  manifest = json.loads((tmp_path / text.CACHE_DIR_NAME / cache[0]).read_text())
  assert manifest["num_documents"] == len(DOCS) and manifest["files"][0]["name"] == "train.jsonl"
  assert manifest["tokenizer_fingerprint"] == "byte" and manifest["dtype"] == "uint16"

  again, log = _load(_data_cfg(path, val_fraction=0.5), tok)  # the split is not part of the cache
  assert tok.calls == len(DOCS) and "from the token cache" in log
  assert isinstance(again.train, np.memmap)
  assert np.array_equal(np.concatenate([again.train, again.val]), np.concatenate([first.train, first.val]))

  _write_jsonl(path, DOCS + ["one more document"])
  changed, log = _load(_data_cfg(path), tok)
  assert tok.calls == 2 * len(DOCS) + 1 and "train.jsonl changed" in log
  assert np.array_equal(np.concatenate([changed.train, changed.val]), _expected(DOCS + ["one more document"]))


def test_interrupted_tokenizing_leaves_no_valid_cache(tmp_path, monkeypatch):
  path = tmp_path / "train.jsonl"
  _write_jsonl(path, DOCS)
  monkeypatch.setattr(text, "_BATCH_DOCS", 4)

  class Crashing(CountingTokenizer):
    def encode_batch(self, texts):
      if self.calls:
        raise KeyboardInterrupt
      return super().encode_batch(texts)

  with pytest.raises(KeyboardInterrupt):
    _load(_data_cfg(path), Crashing())
  assert not list((tmp_path / text.CACHE_DIR_NAME).iterdir())
  tok = CountingTokenizer()
  corpus, _ = _load(_data_cfg(path), tok)
  assert tok.calls == len(DOCS) and len(corpus.train) + len(corpus.val) == len(_expected(DOCS))

  # a rebuild that stops before its manifest is in place leaves no manifest, not the old one
  _write_jsonl(path, DOCS[:5])
  replace = text.os.replace

  def failing_replace(src, dst):
    if str(dst).endswith(".json"):
      raise OSError(28, "No space left on device")
    replace(src, dst)

  monkeypatch.setattr(text.os, "replace", failing_replace)
  with pytest.raises(DataError, match="cannot write the token cache"):
    _load(_data_cfg(path), tok)
  monkeypatch.setattr(text.os, "replace", replace)
  assert not list((tmp_path / text.CACHE_DIR_NAME).glob("*.json"))
  corpus, _ = _load(_data_cfg(path), tok)
  assert len(corpus.train) + len(corpus.val) == len(_expected(DOCS[:5]))


def test_unwritable_data_folder_caches_in_the_user_cache(tmp_path, monkeypatch):
  data = tmp_path / "data"
  data.mkdir()
  _write_jsonl(data / "a.jsonl", DOCS)
  (data / text.CACHE_DIR_NAME).write_text("")  # a file where the cache folder would go: not writable
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  tok = CountingTokenizer()
  _load(_data_cfg(data), tok)
  assert list((tmp_path / "home_cache" / "mla_jax" / "tokens").glob("data.*.json"))
  _, log = _load(_data_cfg(data), tok)
  assert tok.calls == len(DOCS) and "home_cache" in log


def test_progress_lines(tmp_path, monkeypatch):
  _write_jsonl(tmp_path / "a.jsonl", DOCS[:6])
  _write_jsonl(tmp_path / "b.jsonl", DOCS[6:])
  monkeypatch.setattr(text, "PROGRESS_SECONDS", 0.0)
  _, log = _load(_data_cfg(tmp_path))
  lines = [line for line in log.splitlines() if line.startswith(f"tokenizing {tmp_path}:")]
  assert any(" 1/2 files," in line for line in lines) and all("tokens/s" in line for line in lines)
  assert f"tokenized {tmp_path}: 2/2 files" in log


@pytest.mark.parametrize(
  "line,error",
  [
    ('{"text": "fine"', "invalid JSON"),
    ('{"body": "no text here"}', "no 'text' field (set data.text_field; fields here: body)"),
    ('{"text": 42}', "field 'text' is a number, not a string"),
    ('["text"]', "expected a JSON object, found an array"),
  ],
)
def test_bad_records_name_the_file_and_line(tmp_path, line, error):
  path = tmp_path / "bad.jsonl.gz"
  with gzip.open(path, "wt") as f:
    f.write('{"text": "one"}\n\n' + line + "\n")
  with pytest.raises(DataError, match=f"^{re.escape(str(path))}:3: {re.escape(error)}"):
    _load(_data_cfg(path))
  assert not any(p.suffix == ".json" for p in (tmp_path / text.CACHE_DIR_NAME).iterdir())


def test_bad_files_name_the_file(tmp_path, monkeypatch):
  truncated = tmp_path / "cut.jsonl.gz"
  truncated.write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:30])
  with pytest.raises(DataError, match=f"^{truncated}: cannot read"):
    _load(_data_cfg(truncated))
  empty = tmp_path / "empty.jsonl"
  empty.write_text('{"text": ""}\n')
  with pytest.raises(DataError, match=f"^{empty}: no non-empty 'text' texts found"):
    _load(_data_cfg(empty))
  parquet = tmp_path / "t.parquet"
  _write_parquet(parquet, ["a", "b"], field="body")
  with pytest.raises(DataError, match=f"^{parquet}: no 'text' column"):
    _load(_data_cfg(parquet))
  monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
  with pytest.raises(DataError, match=r"needs the 'pyarrow' package \(pip install 'mla_jax\[parquet\]'\)"):
    _load(_data_cfg(parquet, text_field="body"))


def test_token_dtype_follows_the_vocabulary(tmp_path):
  assert text.token_dtype(257) == np.uint16 and text.token_dtype(1 << 16) == np.uint16
  assert text.token_dtype((1 << 16) + 1) == np.uint32
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models, pre_tokenizers

  vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 70_000)}}
  hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  hf.save(str(tmp_path / "tokenizer.json"))
  tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
  docs = ["w69999 w3 w65536", "w70 w65535 zzz"]
  assert [list(ids) for ids in tok.encode_batch(docs)] == [list(tok.encode(d)) for d in docs]
  _write_jsonl(tmp_path / "d.jsonl", docs)
  corpus, _ = _load(_data_cfg(tmp_path / "d.jsonl", val_fraction=0.0), tok)
  assert corpus.train.dtype == np.uint32 and list((tmp_path / text.CACHE_DIR_NAME).glob("d.jsonl.*.u32"))
  assert corpus.train.tolist() == [69999, 3, 65536, 0, 70, 65535, 1, 0]


def test_text_folder_is_cached_and_split_by_file(tmp_path):
  for i, doc in enumerate(DOCS[:6]):
    (tmp_path / f"{i}.txt").write_text(doc)
  (tmp_path / ".notes").write_text("hidden files are not documents")
  tok = CountingTokenizer()
  first, _ = _load(_data_cfg(tmp_path, val_fraction=0.3), tok)
  again, log = _load(_data_cfg(tmp_path, val_fraction=0.3), tok)
  assert tok.calls == 6 and "from the token cache" in log
  assert np.array_equal(first.train, again.train) and np.array_equal(first.val, again.val)
  docs = lambda tokens, offsets: {
    ByteTokenizer().decode(tokens[a : b - 1]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)
  }
  held_out, trained = docs(again.val, again.val_offsets), docs(again.train, again.train_offsets)
  assert held_out and not held_out & trained and held_out | trained == set(DOCS[:6])
