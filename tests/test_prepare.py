"""`prepare`: text -> shards + manifest. Exact ids (chunked BPE equals whole-text BPE), the split,
uint16/uint32, several files and folders, several processes, streaming, named downloads, and
nothing half-written or overwritten on failure."""

from __future__ import annotations

import json
import tracemalloc
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from gpt2_helpers import named_text_or_skip, tokenizer_or_skip

from gpt2 import GPT2Error, data
from gpt2 import prepare as prep
from gpt2.cli import main
from gpt2.prepare import MANIFEST, prepare, read_chunks
from gpt2.tokenizer import CharTokenizer, tokenizer_from_dict


def _mirror() -> Path | None:
    import os  # noqa: PLC0415

    return Path(os.environ["GPT2_DATA_MIRROR"]) if os.environ.get("GPT2_DATA_MIRROR") else None

# Whitespace runs, blank lines, trailing spaces, CRLF, tabs, multi-byte characters, and the special
# token written out: the places where cutting text into chunks could change GPT-2's ids.
TRICKY = ("First line.\nSecond  line  \n\nThird:\tcaf\u00e9 na\u00efve \u4e2d\u6587 \U0001f600!\r\n"
          "   indented\n\n\n  \nx\n'tis 'S n't\n<|endoftext|>\nEnd  \n") * 40


def _ids(folder: Path) -> np.ndarray:
    """All ids of a prepared dataset, train then val, read straight from the shard files."""
    m = json.loads((folder / MANIFEST).read_text())
    parts = [np.fromfile(folder / s["file"], dtype=m["dtype"])
             for split in ("train", "val") for s in m["splits"][split]["shards"]]
    return np.concatenate(parts)


def test_char_dataset_manifest_split_and_round_trip(tmp_path):
    text = TRICKY
    src = tmp_path / "in.txt"
    src.write_bytes(text.encode("utf-8"))
    m = prepare([src], tmp_path / "ds", tokenizer="char", progress=False)
    chars = "".join(sorted(set(text)))
    assert m["tokenizer"] == {"type": "char", "chars": chars} and m["vocab_size"] == len(chars)
    assert m["dtype"] == "uint16" and m["format_version"] == 1 and m["tokens"] == len(text)
    n_train = int(len(text) * 0.9)                                   # nanoGPT's split: first 90%
    assert (m["splits"]["train"]["tokens"], m["splits"]["val"]["tokens"]) == (n_train, len(text) - n_train)
    assert m["sources"][0]["sha256"] == data._sha256(text.encode("utf-8"))
    assert (m["sources"][0]["bytes"], m["sources"][0]["characters"]) == (len(text.encode("utf-8")), len(text))
    tok = tokenizer_from_dict(m["tokenizer"])
    assert tok.decode(_ids(tmp_path / "ds")) == text                 # every character, in order
    assert (tmp_path / "ds" / "train-00000.bin").stat().st_size == 2 * n_train
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "in.txt"]   # no temporary left behind


@pytest.mark.parametrize("chunk_bytes", [64, 1000, 1 << 20])
def test_gpt2_ids_in_chunks_equal_encoding_the_whole_text(tmp_path, chunk_bytes):
    tok = tokenizer_or_skip()
    src = tmp_path / "in.txt"
    src.write_bytes(TRICKY.encode("utf-8"))
    m = prepare([src], tmp_path / "ds", progress=False, chunk_bytes=chunk_bytes)
    assert m["tokenizer"] == {"type": "gpt2"} and m["vocab_size"] == 50257 and m["dtype"] == "uint16"
    assert _ids(tmp_path / "ds").tolist() == tok.encode(TRICKY)


def test_tiny_shakespeare_in_chunks_equals_whole(tmp_path):
    tok = tokenizer_or_skip()
    path = named_text_or_skip("shakespeare")   # the data folder or $GPT2_DATA_MIRROR, not only ../shared
    text = path.read_text(encoding="utf-8")
    prepare([path], tmp_path / "ds", progress=False, chunk_bytes=4096)
    assert _ids(tmp_path / "ds").tolist() == tok.encode(text)          # 338,025 ids


def test_several_processes_give_the_same_ids_in_order(tmp_path, monkeypatch):
    tokenizer_or_skip()
    src = tmp_path / "in.txt"
    src.write_bytes(TRICKY.encode("utf-8"))
    prepare([src], tmp_path / "one", progress=False, chunk_bytes=500, workers=1)
    monkeypatch.setattr(prep, "PARALLEL_BYTES", 0)                   # use the pool even for this
    prepare([src], tmp_path / "two", progress=False, chunk_bytes=500, workers=2)
    assert np.array_equal(_ids(tmp_path / "one"), _ids(tmp_path / "two"))
    # A bad file read while the pool encodes: the same one-line error, nothing left behind.
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(GPT2Error, match="bad.txt is not valid UTF-8"):
        prepare([src, bad], tmp_path / "three", progress=False, chunk_bytes=500, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "in.txt", "one", "two"]


def test_files_and_folders_in_order_with_end_of_text_between(tmp_path):
    tok = tokenizer_or_skip()
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("Second book.\n")
    (folder / "a.txt").write_text("First book.\n")
    (folder / "sub" / "c.txt").write_text("Third book.\n")
    (folder / ".hidden").write_text("not read")
    single = tmp_path / "z.txt"
    single.write_text("Last.\n")
    m = prepare([folder, single], tmp_path / "ds", progress=False, val_fraction=0.2)
    assert [Path(s["path"]).name for s in m["sources"]] == ["a.txt", "b.txt", "c.txt", "z.txt"]
    assert m["document_separator"] == "<|endoftext|>"
    joined = "<|endoftext|>".join(["First book.\n", "Second book.\n", "Third book.\n", "Last.\n"])
    assert _ids(tmp_path / "ds").tolist() == tok.encode(joined)
    # char: the files simply follow each other
    m = prepare([folder, single], tmp_path / "chars", tokenizer="char", progress=False)
    assert m["document_separator"] is None
    assert CharTokenizer(m["tokenizer"]["chars"]).decode(_ids(tmp_path / "chars")) == \
        "First book.\nSecond book.\nThird book.\nLast.\n"


def test_uint32_when_the_vocabulary_does_not_fit_uint16(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000]
    src = tmp_path / "wide.txt"
    src.write_text("".join(chars) * 2, encoding="utf-8")
    m = prepare([src], tmp_path / "ds", tokenizer="char", progress=False)
    assert m["vocab_size"] == len(chars) > 65536 and m["dtype"] == "uint32"
    ids = _ids(tmp_path / "ds")
    assert ids.dtype == np.uint32 and ids.max() == len(chars) - 1


def test_read_chunks_streams_and_keeps_split_characters_whole(tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(TRICKY.encode("utf-8"))
    seen = []
    chunks = list(read_chunks(src, chunk_bytes=7, on_bytes=seen.append))   # reads split é, 中, 😀
    assert "".join(chunks) == TRICKY and len(chunks) > 10
    assert sum(seen) == src.stat().st_size
    # every chunk after the first starts with a newline followed by a printable non-space character
    assert all(c[0] == "\n" and not c[1].isspace() for c in chunks[1:])


def test_memory_stays_about_one_chunk_whatever_the_file_size(tmp_path):
    """Preparing 3 MB and 8 MB, 64 KB at a time, peaks at the same few MB of Python allocations
    (NumPy's included): memory is bounded by the chunk and copy sizes, not by the corpus."""
    line = "Now is the winter of our discontent made glorious summer by this sun of York;\n"
    peaks = []
    for size in (3_000_000, 8_000_000):
        src = tmp_path / f"{size}.txt"
        src.write_text(line * (size // len(line)), encoding="utf-8")
        tracemalloc.start()
        try:
            prepare([src], tmp_path / f"ds{size}", tokenizer="char", progress=False, chunk_bytes=1 << 16)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] < 5_000_000 and abs(peaks[1] - peaks[0]) < 500_000, peaks


@pytest.mark.parametrize("content, fragment", [
    (b"\x00\x01binary", "looks binary"), (b"caf\xe9 au lait", "not valid UTF-8"),
])
def test_bad_sources_leave_nothing_behind(tmp_path, content, fragment):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("fine text\n" * 50)
    bad.write_bytes(content)
    for tokenizer in ("char", "gpt2"):
        if tokenizer == "gpt2":
            tokenizer_or_skip()
        with pytest.raises(GPT2Error, match=fragment) as info:
            prepare([good, bad], tmp_path / "ds", tokenizer=tokenizer, progress=False)
        assert str(bad) in str(info.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "good.txt"]


def test_out_folder_is_never_silently_replaced(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("some text to prepare\n" * 20)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(GPT2Error, match="not a prepared dataset"):
        prepare([src], other, tokenizer="char", progress=False, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    prepare([src], tmp_path / "ds", tokenizer="char", progress=False)
    with pytest.raises(GPT2Error, match="--overwrite"):
        prepare([src], tmp_path / "ds", tokenizer="char", progress=False)
    src.write_text("different text now\n" * 20)
    m = prepare([src], tmp_path / "ds", tokenizer="char", progress=False, overwrite=True)
    assert json.loads((tmp_path / "ds" / MANIFEST).read_text()) == m


def test_too_little_text_to_split(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("abc")
    with pytest.raises(GPT2Error, match="too few to split"):
        prepare([src], tmp_path / "ds", tokenizer="char", progress=False)
    assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------------------------------------
# Named downloads
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fake_shakespeare(tmp_path, monkeypatch):
    """Tiny Shakespeare stood in by a small local file (its SHA-256 put in place of the real one),
    served from a file:// URL; no copy beside the checkout."""
    body = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 30
    server = tmp_path / "server" / "input.txt"
    server.parent.mkdir()
    server.write_bytes(body)
    named = data.NAMED_TEXTS["shakespeare"]
    monkeypatch.setitem(data.NAMED_TEXTS, "shakespeare",
                        data.NamedText(named.title, named.filename, server.as_uri(), data._sha256(body)))
    monkeypatch.delenv("GPT2_DATA_MIRROR", raising=False)
    return body


def test_named_download_is_checked_and_saved_in_the_data_dir(tmp_path, fake_shakespeare, capsys):
    data_dir = tmp_path / "data"
    assert main(["prepare", "shakespeare", "--tokenizer", "char", "--out", str(tmp_path / "ds"),
                 "--data-dir", str(data_dir), "--no-progress"]) == 0
    assert (data_dir / "tinyshakespeare.txt").read_bytes() == fake_shakespeare
    out = capsys.readouterr().out
    assert f"prepared {tmp_path / 'ds'}: 1 file(s), {len(fake_shakespeare):,} bytes" in out
    m = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    assert m["sources"][0]["sha256"] == data._sha256(fake_shakespeare)


def test_named_download_with_the_wrong_hash_is_refused(tmp_path, fake_shakespeare, monkeypatch):
    named = data.NAMED_TEXTS["shakespeare"]
    wrong = data.NamedText(named.title, named.filename, named.url, "0" * 64)
    monkeypatch.setitem(data.NAMED_TEXTS, "shakespeare", wrong)
    with pytest.raises(GPT2Error, match="does not match Tiny Shakespeare's SHA-256"):
        data.named_text_path("shakespeare", tmp_path / "data")
    assert not (tmp_path / "data" / "tinyshakespeare.txt").exists()


def test_offline_message_says_where_to_put_the_file(tmp_path, fake_shakespeare, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(GPT2Error) as info:
        data.named_text_path("shakespeare", tmp_path / "data")
    msg = str(info.value)
    assert str(tmp_path / "data" / "tinyshakespeare.txt") in msg and "no network" in msg
    assert "shared" not in msg and "\n" not in msg
    assert data.NAMED_TEXTS["shakespeare"].url in msg                 # where to fetch it by hand


def test_named_texts_record_the_published_checksums():
    assert data.NAMED_TEXTS["shakespeare"].sha256 == \
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert data.NAMED_TEXTS["shakespeare"].url == \
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    assert data.NAMED_TEXTS["verdict"].sha256 == data.VERDICT_SHA256
    for name, named in data.NAMED_TEXTS.items():
        copy = _mirror() / named.filename if _mirror() else None
        if copy is not None and copy.is_file():
            assert data._sha256(copy.read_bytes()) == named.sha256, name


def test_overwrite_removes_only_the_datasets_own_files(tmp_path):
    """--overwrite replaces the old manifest and shards; the user's files in --out (even the
    source being prepared) stay."""
    out = tmp_path / "ds"
    out.mkdir()
    src = out / "input.txt"                       # nanoGPT's layout: the text inside the dataset folder
    src.write_text("the source, kept\n" * 40)
    (out / "notes.md").write_text("mine")
    with pytest.raises(GPT2Error, match="not a prepared dataset"):
        prepare([src], out, tokenizer="char", progress=False)
    other = tmp_path / "ds2"
    prepare([src], other, tokenizer="char", progress=False, shard_tokens=200)
    (other / "input.txt").write_text("the source, kept\n" * 40)
    (other / "notes.md").write_text("mine")
    old = sorted(p.name for p in other.iterdir())
    assert "train-00002.bin" in old
    m = prepare([other / "input.txt"], other, tokenizer="char", progress=False, overwrite=True)
    names = sorted(p.name for p in other.iterdir())
    assert "input.txt" in names and "notes.md" in names
    assert (other / "input.txt").read_text() == "the source, kept\n" * 40
    assert (other / "notes.md").read_text() == "mine"
    shards = {s["file"] for split in m["splits"].values() for s in split["shards"]}
    assert set(names) == shards | {"input.txt", "notes.md", MANIFEST}   # the old extra shards are gone
    assert not any(n.endswith(".tmp") or n.startswith(".") for n in names)


def test_overwrite_refuses_a_shard_name_the_dataset_does_not_own(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("some text to prepare\n" * 40)
    out = tmp_path / "ds"
    prepare([src], out, tokenizer="char", progress=False)
    (out / "train-00007.bin").write_bytes(b"someone else's")
    with pytest.raises(GPT2Error, match="train-00007.bin"):
        prepare([src], out, tokenizer="char", progress=False, overwrite=True)
    assert (out / "train-00007.bin").read_bytes() == b"someone else's"
    assert (out / MANIFEST).is_file()


def test_prepared_files_get_the_usual_permissions(tmp_path):
    import os  # noqa: PLC0415
    import stat  # noqa: PLC0415

    src = tmp_path / "in.txt"
    src.write_text("some text to prepare\n" * 40)
    prepare([src], tmp_path / "ds", tokenizer="char", progress=False)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "ds").stat().st_mode) == 0o777 & ~umask
    for f in (tmp_path / "ds").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f


def test_a_data_mirror_that_is_not_a_folder_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_DATA_MIRROR", str(tmp_path / "nowhere"))
    with pytest.raises(GPT2Error, match="GPT2_DATA_MIRROR=.*nowhere is not a folder"):
        data.named_text_path("shakespeare", tmp_path / "data", download=False)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("GPT2_DATA_MIRROR", str(tmp_path / "empty"))
    with pytest.raises(GPT2Error, match="GPT2_DATA_MIRROR=.*empty has no tinyshakespeare.txt"):
        data.named_text_path("shakespeare", tmp_path / "data", download=False)


def test_offline_message_names_the_mirror(tmp_path, fake_shakespeare):
    with pytest.raises(GPT2Error, match="GPT2_DATA_MIRROR"):
        data.named_text_path("shakespeare", tmp_path / "data", download=False)


def test_a_downloaded_text_gets_the_usual_permissions(tmp_path, fake_shakespeare):
    import os  # noqa: PLC0415
    import stat  # noqa: PLC0415

    path = data.named_text_path("shakespeare", tmp_path / "data")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
