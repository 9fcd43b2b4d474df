"""Data: the text, its tokens, sliding windows of (input, target) pairs, and a batching loader.

    text = load_text()                                   # The Verdict (downloaded once), or
    text = load_text("my.txt")                           # any UTF-8 text file
    path = named_text_path("shakespeare")                # Tiny Shakespeare (downloaded once)
    train_loader, val_loader = create_loaders(text, batch_size=2, max_length=256, stride=256)
    for x, y in train_loader:                            # x, y: int64 (B, T); y is x shifted by one
        ...

This is the in-memory path (the text tokenized at every start, windows in order); a corpus
prepared once by `python -m gpt2 prepare` is read from disk by gpt2/dataset.py instead, with
the same loader interface.

A language model learns to predict every next token, so one window of T+1 tokens gives T
training examples at once: input ids[i : i+T], target ids[i+1 : i+T+1].
"""

from __future__ import annotations

import hashlib
import io
import os
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import safeio
from .errors import GPT2Error

VERDICT_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
               "ch02/01_main-chapter-code/the-verdict.txt")
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
VERDICT_NAME = "the-verdict.txt"


@dataclass(frozen=True)
class NamedText:
    """A small public text the project knows by name: where to fetch it and its SHA-256."""
    title: str
    filename: str   # kept as <data dir>/<filename>
    url: str
    sha256: str     # of the file itself (for a zip download: of the member, once extracted)
    zip_member: str | None = None  # the URL is a zip archive holding the file under this name
    instead: str = "train on your own UTF-8 text with --data FILE"  # the alternative offered


# `python -m gpt2 prepare verdict` / `prepare shakespeare`, and train's default text.
NAMED_TEXTS = {
    "verdict": NamedText("The Verdict", VERDICT_NAME, VERDICT_URL, VERDICT_SHA256),
    "shakespeare": NamedText(
        "Tiny Shakespeare", "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}

_REPO = Path(__file__).resolve().parents[1]


def _mirror_dir() -> Path | None:
    """$GPT2_DATA_MIRROR: a local folder holding copies of the named texts (an offline machine, a
    shared cache), used before the network; each copy must match its SHA-256."""
    mirror = os.environ.get("GPT2_DATA_MIRROR")
    if not mirror:
        return None
    if not Path(mirror).is_dir():
        raise GPT2Error(f"GPT2_DATA_MIRROR={mirror} is not a folder; point it at a folder holding copies of "
                        f"{' and '.join(t.filename for t in NAMED_TEXTS.values())}, or unset it")
    return Path(mirror)


# ---------------------------------------------------------------------------------------------
# Getting the text
# ---------------------------------------------------------------------------------------------

def default_data_dir() -> Path:
    """Where the story is kept: $GPT2_DATA_DIR, else `data/` in the checkout (git-ignored), else
    `./data` when the package is installed elsewhere."""
    if os.environ.get("GPT2_DATA_DIR"):
        return Path(os.environ["GPT2_DATA_DIR"])
    if (_REPO / "pyproject.toml").is_file():
        return _REPO / "data"
    return Path.cwd() / "data"


def read_text(path) -> str:
    """A UTF-8 text file's contents; GPT2Error if it is missing, empty, binary or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise GPT2Error(f"data file {path} does not exist (or is not a file); pass --data with a UTF-8 "
                        "text file")
    raw = path.read_bytes()
    if not raw.strip():
        raise GPT2Error(f"data file {path} is empty; it needs some text to train on")
    if b"\x00" in raw:
        raise GPT2Error(f"data file {path} looks binary (it contains NUL bytes); use a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GPT2Error(f"data file {path} is not valid UTF-8 (byte {exc.start}); "
                        "convert it, e.g. iconv -t UTF-8") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """A reader never sees half a file (safeio.atomic_write: a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    safeio.atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def verdict_path(data_dir=None, download: bool = True) -> Path:
    """Path to The Verdict, fetching it on first use; $GPT2_DATA (a file) wins if set.
    See `named_text_path` for where it is looked for."""
    if os.environ.get("GPT2_DATA"):
        path = Path(os.environ["GPT2_DATA"])
        if not path.is_file():
            raise GPT2Error(f"GPT2_DATA={path} is not a file; point it at a copy of {VERDICT_NAME}, or unset "
                            "it (The Verdict is then downloaded), or pass --data FILE")
        return path
    return named_text_path("verdict", data_dir, download)


def named_text_path(name: str, data_dir=None, download: bool = True, url: str | None = None) -> Path:
    """Path to one of NAMED_TEXTS ("verdict", "shakespeare"), fetching it on first use.

    Looked for in order: `<data_dir>/<filename>` (checked against its SHA-256), a copy in
    $GPT2_DATA_MIRROR (copied into data_dir), and finally its URL (`url` replaces it: tests
    pass a file:// URL). The download is checked against the SHA-256 before it is saved.
    """
    if name not in NAMED_TEXTS:
        raise GPT2Error(f"unknown dataset name {name!r}; choose one of {', '.join(NAMED_TEXTS)} "
                        "or give a path")
    return fetch_named(NAMED_TEXTS[name], data_dir, download, url)


def fetch_named(named: NamedText, data_dir=None, download: bool = True, url: str | None = None) -> Path:
    """Path to the file `named` describes, fetched once: see `named_text_path` for where it is
    looked for. Fine-tuning's data sets (gpt2/finetune) come through here too."""
    url = url or named.url
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    path = data_dir / named.filename
    if path.is_file():
        if _sha256(path.read_bytes()) != named.sha256:
            raise GPT2Error(f"{path} does not match {named.title}'s SHA-256 ({named.sha256[:12]}...); "
                            f"delete it to download it again, or {named.instead}")
        return path
    mirror = _mirror_dir()
    copy = mirror / named.filename if mirror else None
    mirror_note = ""
    if copy is not None:
        if not copy.is_file():
            mirror_note = f"GPT2_DATA_MIRROR={mirror} has no {named.filename}; "
        elif _sha256(copy.read_bytes()) != named.sha256:
            mirror_note = f"{copy} (GPT2_DATA_MIRROR) does not match {named.title}'s SHA-256; "
        else:
            try:
                _write_atomic(path, copy.read_bytes())
                return path
            except OSError:
                return copy  # a read-only data folder: read the mirror's copy in place
    if not download:
        raise GPT2Error(mirror_note + _absent_message(named, path, "downloading is off"))
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except Exception as exc:  # URLError, timeouts, HTTP errors
        reason = getattr(exc, "reason", exc)
        raise GPT2Error(mirror_note + _absent_message(named, path, f"could not download it: {reason}")
                        ) from None
    if named.zip_member is not None:
        data = _zip_member(data, named, url)
    if _sha256(data) != named.sha256:
        raise GPT2Error(f"the download from {url} does not match {named.title}'s SHA-256 "
                        f"{named.sha256[:12]}...; {named.instead} instead")
    _write_atomic(path, data)
    return path


def _zip_member(data: bytes, named: NamedText, url: str) -> bytes:
    """The file `named.zip_member` from the zip archive `data` (downloaded from `url`)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.read(named.zip_member)
    except (zipfile.BadZipFile, KeyError):
        raise GPT2Error(f"the download from {url} is not a zip archive holding {named.zip_member}; "
                        f"{named.instead} instead") from None


def _absent_message(named: NamedText, path: Path, why: str) -> str:
    save = (f"extract {named.zip_member} from it and save that as {path}" if named.zip_member
            else f"save it as {path}")
    return (f"{named.title} is not in {path.parent} and {why}; download {named.url} and {save} (or set "
            f"GPT2_DATA_MIRROR to a folder holding {named.filename}), or {named.instead}")


def load_text(path=None) -> str:
    """The training text: the file at `path`, or The Verdict when `path` is None."""
    return read_text(path if path is not None else verdict_path())


# ---------------------------------------------------------------------------------------------
# Windows and batches
# ---------------------------------------------------------------------------------------------

def split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """Split by characters, as the book does: the first 90% for training, the rest for validation."""
    if not 0.0 < train_ratio < 1.0:
        raise GPT2Error(f"train_ratio must be in (0, 1), got {train_ratio}")
    cut = int(train_ratio * len(text))
    return text[:cut], text[cut:]


class GPTDataset:
    """Every window of `max_length` + 1 tokens, starting every `stride` tokens.

    Window i starts at s_i = i * stride and gives
        input  = ids[s_i     : s_i + max_length]
        target = ids[s_i + 1 : s_i + max_length + 1]     (the same tokens, shifted by one)
    Starts run while s_i < len(ids) - max_length, so the last target token exists. stride =
    max_length gives non-overlapping windows (the book's choice for training, which avoids
    showing the model the same tokens twice per epoch); a smaller stride gives overlapping ones.
    """

    def __init__(self, ids, max_length: int, stride: int):
        for name, v in (("max_length", max_length), ("stride", stride)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise GPT2Error(f"{name} must be a positive integer, got {v!r}")
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.max_length = int(max_length)
        self.stride = int(stride)
        if len(self.ids) <= self.max_length:
            raise GPT2Error(f"the text has {len(self.ids)} tokens, too few for one window of "
                            f"{self.max_length} + 1; use a longer text or a smaller --context-length")
        self.starts = np.arange(0, len(self.ids) - self.max_length, self.stride)   # (N,)
        self._offsets = np.arange(self.max_length + 1)                              # (T+1,)

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, index) -> tuple[np.ndarray, np.ndarray]:
        """Windows `index` (an int array of shape (B,)) -> inputs, targets, each (B, T)."""
        windows = self.ids[self.starts[index][:, None] + self._offsets]   # (B, T+1), one gather
        return windows[:, :-1], windows[:, 1:]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.batch(np.array([i]))
        return x[0], y[0]


class EpochPosition:
    """The position of a loader in its stream of batches: (epoch, batch_index), moved by iterating.

    A loader supplies `batches(epoch, start)` and `len()`. Iterating gives the rest of the
    current epoch and then moves on to the next; the position moves *before* each batch is
    handed out, so a checkpoint saved while the caller works on it resumes with the next one
    (after the last batch: the next epoch)."""

    epoch = 0
    batch_index = 0
    KIND = "windows"   # what state_dict() records, so a state is put back only into its own kind

    def __iter__(self):
        for x, y in self.batches(self.epoch, self.batch_index):
            self.batch_index += 1
            if self.batch_index == len(self):
                self.epoch, self.batch_index = self.epoch + 1, 0
            yield x, y

    def state_dict(self) -> dict:
        return {"kind": self.KIND, "epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed,
                "shuffle": self.shuffle, "batch_size": self.batch_size, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position: the same kind of loader over the same windows and batch
        size, or a GPT2Error saying which differs. (Older text-file states carry no "kind".)"""
        def whole(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0
        if not (isinstance(state, dict) and all(whole(state.get(k)) for k in ("epoch", "batch_index", "seed"))
                and isinstance(state.get("shuffle", False), bool)):
            raise GPT2Error("the saved data loader position is invalid (the checkpoint is damaged)")
        if state.get("kind", "windows") != self.KIND:
            saved, this = ("a prepared dataset", "a text file") if self.KIND == "windows" else \
                ("a plain text file", "a prepared dataset")
            raise GPT2Error(f"the saved data loader state is for {saved}, not {this}; resume with the "
                            "run's own --data")
        if state.get("num_windows", self.num_windows) != self.num_windows or \
                state.get("batch_size", self.batch_size) != self.batch_size:
            raise GPT2Error("the saved data loader state is for different data or batch size "
                            f"({state.get('num_windows')} windows, batch {state.get('batch_size')}; now "
                            f"{self.num_windows} windows, batch {self.batch_size})")
        if not state["batch_index"] < len(self):
            raise GPT2Error(f"the saved data loader position {state['batch_index']} is outside the "
                            f"{len(self)} batches of an epoch")
        self.epoch, self.batch_index, self.seed = state["epoch"], state["batch_index"], state["seed"]
        self.shuffle = state.get("shuffle", self.shuffle)


class DataLoader(EpochPosition):
    """Batches of windows, optionally shuffled, one epoch after another.

    Iterating gives the rest of the current epoch, batch by batch, and then moves on to the next
    epoch; a fresh `for` loop therefore continues where the last one stopped. The order of epoch
    e is a permutation drawn from a generator seeded with (seed, e), so it depends on nothing
    else: `state_dict()` (epoch, batch index, seed) is all a resumed run needs to see exactly the
    batches an uninterrupted run would.

    `drop_last` drops a final batch smaller than `batch_size` (the book does this for training,
    so every step sees the same number of tokens).
    """

    def __init__(self, dataset: GPTDataset, batch_size: int, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0):
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size <= 0:
            raise GPT2Error(f"batch size must be a positive integer, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.epoch = 0        # the epoch being iterated
        self.batch_index = 0  # the next batch of that epoch
        if len(self) == 0:
            raise GPT2Error(f"{len(dataset)} window(s) cannot fill one batch of {batch_size} with "
                            "drop_last; use a smaller --batch-size or --context-length, or a longer text")

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.dataset.max_length

    def order(self, epoch: int) -> np.ndarray:
        """The window order of an epoch: 0..N-1, or a permutation seeded by (seed, epoch)."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def batches(self, epoch: int | None = None, start: int = 0):
        """The batches of `epoch` (default: the current one) from batch `start` on, without
        touching the loader's position (evaluation uses this)."""
        order = self.order(self.epoch if epoch is None else epoch)
        for i in range(start, len(self)):
            yield self.dataset.batch(order[i * self.batch_size:(i + 1) * self.batch_size])

    @property
    def num_windows(self) -> int:
        return len(self.dataset)


def create_dataloader(text: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                      shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                      tokenizer=None) -> DataLoader:
    """Tokenize `text` and wrap it in a GPTDataset and a DataLoader (the book's create_dataloader_v1)."""
    if tokenizer is None:
        from .tokenizer import get_tokenizer  # noqa: PLC0415
        tokenizer = get_tokenizer()
    dataset = GPTDataset(tokenizer.encode(text), max_length, stride)
    return DataLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)


def create_loaders(text: str, batch_size: int, max_length: int, stride: int | None = None,
                   train_ratio: float = 0.9, seed: int = 0, tokenizer=None) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders over a 90/10 split by characters, as in the book's chapter 5:
    training batches shuffled with drop_last, validation in order and complete."""
    stride = max_length if stride is None else stride
    train_text, val_text = split_text(text, train_ratio)
    try:
        train = create_dataloader(train_text, batch_size, max_length, stride, shuffle=True,
                                  drop_last=True, seed=seed, tokenizer=tokenizer)
    except GPT2Error as exc:
        raise GPT2Error(f"training split ({train_ratio:.0%} of the text): {exc}") from None
    try:
        val = create_dataloader(val_text, batch_size, max_length, stride, shuffle=False,
                                drop_last=False, seed=seed, tokenizer=tokenizer)
    except GPT2Error as exc:
        raise GPT2Error(f"validation split (the last {1 - train_ratio:.0%} of the text): {exc}") from None
    return train, val
