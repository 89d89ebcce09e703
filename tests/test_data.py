"""`llama2nb data`: story splitting, train-vocab, pretokenize, export-tokenizer, download."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import sentencepiece as spm
from click.testing import CliRunner

from llama2nb.cli import main
from llama2nb.tokenizer import Tokenizer
from llama2nb.training.data import (encode_stories, read_meta, read_stories, shard_dtype, split_stories,
                                    tinystories_shards)
from tests.conftest import LLAMA2_BIN, LLAMA2_MODEL, SHARED, requires
from tests.test_training_helpers import prepare_data, synthetic_stories, write_blank_line_text, write_eot_text

TRAIN_EXCERPT = SHARED / "data" / "tinystories-train-excerpt.txt"
VALID_EXCERPT = SHARED / "data" / "tinystories-valid-excerpt.txt"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return prepare_data(tmp_path_factory.mktemp("data"))


def test_split_stories_both_layouts(tmp_path):
    stories = ["One day, Tom ran.\nHe was fast.", "Lily sang.", "The end came.\n\nAnd a new paragraph."]
    eot = write_eot_text(tmp_path / "a.txt", stories)
    assert read_stories(eot) == stories  # blank lines inside a story stay when <|endoftext|> separates
    blank = write_blank_line_text(tmp_path / "b.txt", stories[:2])
    assert read_stories(blank) == stories[:2]
    assert split_stories("\n\n  \n") == []
    assert split_stories("<|endoftext|>\nA\n<|endoftext|>\n\n<|endoftext|>\nB") == ["A", "B"]


def test_read_json_shard(tmp_path):
    shard = tmp_path / "data00.json"
    shard.write_text(json.dumps([{"story": " Once. ", "instruction": {}}, {"story": ""}, {"story": "Twice."}]))
    assert read_stories(shard) == ["Once.", "Twice."]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        read_stories(bad)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="expected UTF-8 text"):
        read_stories(latin)


@requires(TRAIN_EXCERPT)
def test_real_excerpts_split():
    train = read_stories(TRAIN_EXCERPT)
    assert len(train) == 2316 and not any("<|endoftext|>" in s for s in train)
    valid = read_stories(VALID_EXCERPT)
    assert len(valid) > 1000 and all(s == s.strip() and "\n\n" not in s for s in valid)


def test_pretokenize_layout(data):
    meta = read_meta(data["shards"])
    assert meta["vocab_size"] == data["vocab"] and meta["dtype"] == np.uint16 and meta["bos_id"] == 1
    sp = spm.SentencePieceProcessor(model_file=str(data["model"]))
    assert sp.get_piece_size() == data["vocab"]
    train = np.fromfile(data["shards"] / "train-000.bin", dtype=np.uint16)
    stories = read_stories(data["train_txt"])
    expected = [i for s in stories for i in [1] + sp.encode(s)]
    assert train.tolist() == expected
    assert (train == 1).sum() == len(stories) == 400  # every story starts with BOS, and only there
    val = np.fromfile(data["shards"] / "val-000.bin", dtype=np.uint16)
    assert (val == 1).sum() == 60
    assert not list(data["shards"].glob(".*tmp*"))


def test_vocab_is_llama2c_style(data):
    sp = spm.SentencePieceProcessor(model_file=str(data["model"]))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert pieces[:3] == ["<unk>", "<s>", "</s>"] and pieces[3] == "<0x00>" and pieces[258] == "<0xFF>"
    digits = [p for p in sp.encode("123", out_type=str) if p.strip("\u2581")]
    assert len(digits) == 3  # split digits (byte pieces here: the synthetic text has no digits)
    assert sp.encode("é✓") and all(0 <= i < data["vocab"] for i in sp.encode("é✓"))  # byte fallback
    tok = Tokenizer.load(data["bin"], vocab_size=data["vocab"])  # the .bin loads in the engine's tokenizer
    text = "Once upon a time, Lily saw 42 cats."
    assert tok.encode(text, bos=True) == [1] + sp.encode(text)


def test_parallel_pretokenize_equals_serial(data):
    stories = synthetic_stories(50, seed=9)
    one = encode_stories(stories, data["model"], np.dtype(np.uint16), workers=1, chunk=7)
    two = encode_stories(stories, data["model"], np.dtype(np.uint16), workers=2, chunk=7)
    assert one.tolist() == two.tolist()


def test_shard_dtype():
    assert shard_dtype(512) == np.uint16 and shard_dtype(32000) == np.uint16 and shard_dtype(65535) == np.uint16
    assert shard_dtype(65536) == np.uint32 and shard_dtype(128256) == np.uint32


def test_pretokenize_holds_out_validation(data, tmp_path):
    r = CliRunner().invoke(main, ["data", "pretokenize", "--tokenizer", str(data["model"]), "--text",
                                  str(data["train_txt"]), "--val-fraction", "0.1", "--data-dir", str(tmp_path),
                                  "--workers", "1"])
    assert r.exit_code == 0, r.output
    out = tmp_path / data["model"].stem
    n_train = (np.fromfile(out / "train-000.bin", np.uint16) == 1).sum()
    n_val = (np.fromfile(out / "val-000.bin", np.uint16) == 1).sum()
    assert (n_train, n_val) == (360, 40)


def test_data_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["data", "pretokenize", "--vocab-size", "999", "--data-dir", str(tmp_path)])
    assert r.exit_code == 1 and "tok999.model" in r.output and "train-vocab" in r.output
    r = runner.invoke(main, ["data", "train-vocab", "--vocab-size", "300", "--data-dir", str(tmp_path)])
    assert r.exit_code == 1 and "TinyStories_all_data" in r.output and "Traceback" not in r.output
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello world\n\nfoo bar\n")
    r = runner.invoke(main, ["data", "train-vocab", "--vocab-size", "5000", "--text", str(tiny), "--data-dir", str(tmp_path)])
    assert r.exit_code == 1 and "Vocabulary size too high" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "tok5000.model").exists()
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"garbage")
    r = runner.invoke(main, ["export-tokenizer", str(bad), str(tmp_path / "t.bin")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "SentencePiece" in r.output


@requires(LLAMA2_MODEL)
def test_export_tokenizer_byte_identical(tmp_path):
    out = tmp_path / "tokenizer.bin"
    r = CliRunner().invoke(main, ["export-tokenizer", str(LLAMA2_MODEL), str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == LLAMA2_BIN.read_bytes()


def test_export_tokenizer_own_vocab(data, tmp_path):
    out = tmp_path / "t.bin"
    r = CliRunner().invoke(main, ["export-tokenizer", str(data["model"]), str(out)])
    assert r.exit_code == 0 and out.read_bytes() == data["bin"].read_bytes()


def test_data_download_from_local_standin(tmp_path, monkeypatch):
    """`data download` through huggingface_hub, with hf_hub_download patched to serve a local
    archive laid out as roneneldan/TinyStories' TinyStories_all_data.tar.gz (and the hub's
    metadata request patched to answer)."""
    archive = tmp_path / "TinyStories_all_data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(3):
            payload = json.dumps([{"story": s} for s in synthetic_stories(20, seed=i)]).encode()
            info = tarfile.TarInfo(f"data{i:02d}.json")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    calls = []

    def fake_download(repo_id, filename, repo_type=None, cache_dir=None, **kw):
        calls.append((repo_id, filename, repo_type))
        return str(archive)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url, timeout: None)  # the hub answers
    data_dir = tmp_path / "data"
    r = CliRunner().invoke(main, ["data", "download", "--data-dir", str(data_dir)])
    assert r.exit_code == 0, r.output
    assert calls == [("roneneldan/TinyStories", "TinyStories_all_data.tar.gz", "dataset")]
    shards = tinystories_shards(data_dir)
    assert [s.name for s in shards] == ["data00.json", "data01.json", "data02.json"]
    assert len(read_stories(shards[1])) == 20
    # then the TinyStories path of train-vocab and pretokenize (shard 0 is validation)
    r = CliRunner().invoke(main, ["data", "train-vocab", "--vocab-size", "300", "--data-dir", str(data_dir)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["data", "pretokenize", "--vocab-size", "300", "--data-dir", str(data_dir),
                                  "--workers", "1"])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (data_dir / "tok300").glob("*.bin"))
    assert names == ["train-000.bin", "train-001.bin", "val-000.bin"]
    # a failing hub is one line
    def failing(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    r = CliRunner().invoke(main, ["data", "download", "--data-dir", str(tmp_path / "d2")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "download failed" in r.output
