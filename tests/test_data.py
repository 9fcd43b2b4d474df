"""gpt2.tokenizer and gpt2.data: tokens, the story, sliding windows, the loader and its state."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
from gpt2_helpers import ByteTokenizer, tokenizer_or_skip, verdict_or_skip

from gpt2 import GPT2Error, data, tokenizer
from gpt2.data import DataLoader, GPTDataset, create_dataloader, create_loaders, read_text, split_text

# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def test_tokenizer_known_ids():
    tok = tokenizer_or_skip()
    assert tok.encode("Hello, I am") == [15496, 11, 314, 716]
    assert tok.decode([15496, 11, 314, 716]) == "Hello, I am"
    assert tok.n_vocab == 50257 and tok.eot_id == 50256


def test_tokenizer_endoftext_and_roundtrip():
    tok = tokenizer_or_skip()
    ids = tok.encode("Hello<|endoftext|>In the sunlit terraces")
    assert 50256 in ids
    assert tok.decode(ids) == "Hello<|endoftext|>In the sunlit terraces"
    text = "Akwirw ier, naïve café — 東京 🙂"   # unknown words and any Unicode: BPE falls back to bytes
    assert tok.decode(tok.encode(text)) == text
    assert tokenizer.ids_to_text(tokenizer.text_to_ids("Every effort moves you")) == "Every effort moves you"


def test_tokenizer_unavailable_is_one_clear_line(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Name or service not known\nsecond line")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent/cache")
    tokenizer.get_tokenizer.cache_clear()
    try:
        with pytest.raises(GPT2Error) as info:
            tokenizer.get_tokenizer()
    finally:
        tokenizer.get_tokenizer.cache_clear()
    msg = str(info.value)
    assert "TIKTOKEN_CACHE_DIR" in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------------
# reading text
# ---------------------------------------------------------------------------------------------


def test_read_text_good_and_bad_files(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("naïve café\n", encoding="utf-8")
    assert read_text(good) == "naïve café\n"
    cases = {
        "missing.txt": None,
        "empty.txt": b"",
        "blank.txt": b" \n\t\n",
        "binary.bin": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        "latin1.txt": "café".encode("latin-1"),
    }
    words = {"missing.txt": "does not exist", "empty.txt": "empty", "blank.txt": "empty",
             "binary.bin": "binary", "latin1.txt": "UTF-8"}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(GPT2Error, match=words[name]):
            read_text(path)
    with pytest.raises(GPT2Error):
        read_text(tmp_path)  # a directory


def test_split_text_is_90_10_by_characters():
    text = "x" * 95 + "y" * 5
    train, val = split_text(text)
    assert (len(train), len(val)) == (90, 10) and train + val == text
    with pytest.raises(GPT2Error):
        split_text(text, 1.0)


# ---------------------------------------------------------------------------------------------
# The Verdict: finding, downloading, verifying
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_story(monkeypatch, tmp_path):
    """An empty data dir, no $GPT2_DATA, no shared copy: only the download is left."""
    monkeypatch.delenv("GPT2_DATA", raising=False)
    monkeypatch.delenv("GPT2_DATA_MIRROR", raising=False)
    return tmp_path / "data"


def test_verdict_offline_and_absent_names_both_options(no_story, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(GPT2Error) as info:
        data.verdict_path(no_story)
    msg = str(info.value)
    assert "--data FILE" in msg and str(no_story / "the-verdict.txt") in msg and "\n" not in msg
    assert "shared" not in msg and data.VERDICT_URL in msg   # users have no ../shared
    with pytest.raises(GPT2Error, match="--data FILE"):
        data.verdict_path(no_story, download=False)


class _FakeResponse:
    def __init__(self, body):
        self.body = body

    def read(self):
        return self.body

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_verdict_download_is_verified_and_atomic(no_story, monkeypatch):
    body = b"I had always thought Jack Gisburn rather a cheap genius.\n"
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: _FakeResponse(body))
    # A download whose hash does not match is rejected and nothing is written.
    with pytest.raises(GPT2Error, match="SHA-256"):
        data.verdict_path(no_story)
    assert not list(no_story.glob("*")) if no_story.exists() else True
    # With the matching hash it is saved (via a temporary file, none left behind) and then reused.
    monkeypatch.setitem(data.NAMED_TEXTS, "verdict",
                        data.NamedText("The Verdict", data.VERDICT_NAME, data.VERDICT_URL,
                                       data._sha256(body)))
    path = data.verdict_path(no_story)
    assert path == no_story / "the-verdict.txt" and path.read_bytes() == body
    assert sorted(p.name for p in no_story.iterdir()) == ["the-verdict.txt"]
    monkeypatch.setattr(data.urllib.request, "urlopen", None)   # must not be called again
    assert data.verdict_path(no_story) == path


def test_verdict_with_wrong_hash_on_disk_is_an_error(no_story):
    no_story.mkdir()
    (no_story / "the-verdict.txt").write_text("not the story")
    with pytest.raises(GPT2Error, match="SHA-256"):
        data.verdict_path(no_story)


def test_gpt2_data_env_points_at_a_file(monkeypatch, tmp_path):
    story = tmp_path / "story.txt"
    story.write_text("once upon a time")
    monkeypatch.setenv("GPT2_DATA", str(story))
    assert data.verdict_path() == story
    assert data.load_text() == "once upon a time"


def test_the_verdict_itself():
    path = verdict_or_skip()
    text = read_text(path)
    assert len(text) == 20479 and text.startswith("I HAD always thought Jack Gisburn")


# ---------------------------------------------------------------------------------------------
# sliding windows
# ---------------------------------------------------------------------------------------------


def test_windows_are_shifted_by_one():
    ids = np.arange(100, 120)                       # 20 tokens
    ds = GPTDataset(ids, max_length=4, stride=4)
    assert len(ds) == 4                              # starts 0, 4, 8, 12 (16 + 4 + 1 > 20)
    x, y = ds.batch(np.arange(len(ds)))
    assert x.shape == y.shape == (4, 4) and x.dtype == np.int64
    assert (x[:, 0] == [100, 104, 108, 112]).all()
    assert (y == x + 1).all()                        # the target is the next token
    x0, y0 = ds[0]
    assert (x0 == [100, 101, 102, 103]).all() and (y0 == [101, 102, 103, 104]).all()


def test_window_counts_and_strides():
    ids = np.arange(50)
    assert len(GPTDataset(ids, 10, 1)) == 40         # every start with a full target
    assert len(GPTDataset(ids, 10, 10)) == 4         # 0, 10, 20, 30 (40 would need token 50)
    assert len(GPTDataset(np.arange(11), 10, 10)) == 1
    x, y = GPTDataset(np.arange(11), 10, 10)[0]
    assert y[-1] == 10


def test_text_too_short_for_one_window_is_an_error():
    with pytest.raises(GPT2Error, match="too few"):
        GPTDataset(np.arange(10), max_length=10, stride=1)
    with pytest.raises(GPT2Error, match="max_length"):
        GPTDataset(np.arange(10), max_length=0, stride=1)
    with pytest.raises(GPT2Error, match="too few"):
        create_dataloader("hi", batch_size=1, max_length=8, stride=8, tokenizer=ByteTokenizer())


# ---------------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------------


def _loader(n_windows=10, batch_size=3, **kw):
    ds = GPTDataset(np.arange(n_windows * 4 + 1), max_length=4, stride=4)
    assert len(ds) == n_windows
    return DataLoader(ds, batch_size, **kw)


def _first_tokens(batches):
    return [x[:, 0].tolist() for x, _ in batches]


def test_loader_batch_sizes_and_drop_last():
    assert [x.shape for x, _ in _loader()] == [(3, 4)] * 3 + [(1, 4)]
    assert len(_loader()) == 4
    kept = _loader(drop_last=True)
    assert len(kept) == 3 and [x.shape for x, _ in kept] == [(3, 4)] * 3
    with pytest.raises(GPT2Error, match="batch"):
        _loader(n_windows=2, batch_size=3, drop_last=True)
    with pytest.raises(GPT2Error, match="batch size"):
        _loader(batch_size=0)


def test_loader_unshuffled_order_and_epochs():
    loader = _loader(n_windows=4, batch_size=2)
    assert _first_tokens(loader) == [[0, 4], [8, 12]]
    assert loader.epoch == 1 and loader.batch_index == 0
    assert _first_tokens(loader) == [[0, 4], [8, 12]]


def test_loader_shuffle_is_seeded_per_epoch():
    a, b = _loader(shuffle=True, seed=7), _loader(shuffle=True, seed=7)
    e0, e1 = _first_tokens(a), _first_tokens(a)
    assert e0 == _first_tokens(b) and e1 == _first_tokens(b)       # same seed, same batches
    assert e0 != e1                                                 # a new order every epoch
    assert sorted(sum(e0, [])) == list(range(0, 40, 4))             # each window exactly once
    assert _first_tokens(_loader(shuffle=True, seed=8)) != e0


def test_loader_state_resumes_mid_epoch():
    full = _loader(shuffle=True, seed=3, drop_last=True)
    reference = _first_tokens(full) + _first_tokens(full) + _first_tokens(full)   # 3 epochs, 9 batches

    run = _loader(shuffle=True, seed=3, drop_last=True)
    seen = _first_tokens(run)                           # epoch 0
    it = iter(run)
    seen += [next(it)[0][:, 0].tolist() for _ in range(2)]   # two batches of epoch 1, then "crash"
    state = run.state_dict()
    assert state["epoch"] == 1 and state["batch_index"] == 2 and state["seed"] == 3

    resumed = _loader(shuffle=True, seed=0, drop_last=True)   # the state's seed wins
    resumed.load_state_dict(state)
    while resumed.epoch < 3:
        seen.extend(_first_tokens(resumed))
    assert seen == reference


def test_loader_batches_does_not_move_the_position():
    loader = _loader(shuffle=True, seed=1)
    it = iter(loader)
    next(it)
    before = loader.state_dict()
    peek = _first_tokens(loader.batches())
    assert loader.state_dict() == before
    assert peek == _first_tokens(loader.batches(epoch=0))


def test_loader_state_for_other_data_is_rejected():
    state = _loader().state_dict()
    with pytest.raises(GPT2Error, match="different data"):
        _loader(n_windows=12).load_state_dict(state)
    with pytest.raises(GPT2Error, match="position"):
        _loader().load_state_dict({**state, "batch_index": 99})


def test_create_loaders_synthetic():
    text = "".join(chr(97 + (i * 7) % 26) for i in range(1000))
    train, val = create_loaders(text, batch_size=4, max_length=16, tokenizer=ByteTokenizer())
    assert train.shuffle and train.drop_last and not val.shuffle and not val.drop_last
    x, y = next(iter(train))
    assert x.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()
    # 900 training bytes -> 56 windows -> 14 batches; 100 validation bytes -> 6 windows -> 2 batches
    assert (len(train), len(val)) == (14, 2)
    with pytest.raises(GPT2Error, match="validation"):
        create_loaders(text, batch_size=1, max_length=200, tokenizer=ByteTokenizer())


def test_course_loaders_on_the_verdict():
    tok = tokenizer_or_skip()
    text = read_text(verdict_or_skip())
    assert len(tok.encode(text)) == 5145
    train, val = create_loaders(text, batch_size=2, max_length=256, seed=123, tokenizer=tok)
    assert (len(train), len(val)) == (9, 1)                           # as in the book
    assert sum(x.size for x, _ in train.batches()) == 4608
    assert sum(x.size for x, _ in val.batches()) == 512
