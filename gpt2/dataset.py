"""Prepared datasets (made by `python -m gpt2 prepare`): memory-mapped shards and random windows.

    ds = PreparedDataset("data/shakespeare_char")
    ds.tokenizer                          # CharTokenizer(vocab_size=65), from the manifest
    train = ds.loader("train", batch_size=12, context_length=64, seed=1337)
    x, y = train.get_batch(0)             # int64 (12, 64) each; y is x shifted by one
    for x, y in train: ...                # the same batches in order: 0, 1, 2, ...

The shards are opened with np.memmap: the operating system pages in only the windows a batch
reads, so a corpus of any size costs no memory up front. A batch is `batch_size` windows of
`context_length` + 1 tokens starting at random places (nanoGPT's `get_batch`), drawn from a
generator seeded with (seed, split, batch index): batch i is the same whatever happened before
it, so a loader's whole state is a counter, a resumed run sees exactly the batches an
uninterrupted one would, and a rank of a data-parallel run can take its slice of a global batch
(`get_batch(i, rank, world_size)`).

The loader also speaks the in-memory DataLoader's language (gpt2/data.py), which `train()` uses:
`__len__` is a nominal epoch (as many batches as it takes to see as many tokens as the split
holds), `epoch`/`batch_index` the position, `state_dict()`/`load_state_dict()` for checkpoints,
and `eval_batches(n, key)`: n random batches from a separate stream, the same for the same key
(train passes the step), so the evaluation of a resumed run matches too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .data import EpochPosition
from .errors import GPT2Error
from .prepare import FORMAT, FORMAT_VERSION, MANIFEST
from .tokenizer import tokenizer_from_dict

SPLITS = ("train", "val")
CHECK_IDS_UP_TO = 200_000_000   # shards up to this many tokens are checked whole when opened (< 1 s)
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


def is_prepared_dataset(path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


class PreparedDataset:
    """A prepared dataset folder: its manifest, tokenizer, and each split's shards as memmaps.

    Every shard's size is checked against the manifest before use (a truncated copy is one
    GPT2Error naming the file, not garbage batches), and ids beyond the vocabulary are refused,
    naming the file: when it is opened (shards up to CHECK_IDS_UP_TO tokens), else as a batch
    reads them.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise GPT2Error(f"{self.folder} is not a prepared dataset ({MANIFEST} is missing); make one with "
                            f"`python -m gpt2 prepare TEXT --out {self.folder}`")
        raw = path.read_bytes()
        try:
            m = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise GPT2Error(f"{path} is not valid JSON (damaged?); prepare the dataset again") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise GPT2Error(f"{path} is not a minigrad-gpt2 dataset manifest; prepare the dataset again")
        if m.get("format_version") != FORMAT_VERSION:
            raise GPT2Error(f"{path} has format version {m.get('format_version')!r}, this version reads "
                            f"{FORMAT_VERSION}; prepare the dataset again")
        self.manifest = m
        self.digest = hashlib.sha256(raw).hexdigest()   # identifies the data for resume
        self.tokenizer = tokenizer_from_dict(m.get("tokenizer"))
        if m.get("vocab_size") != self.tokenizer.vocab_size:
            raise GPT2Error(f"{path}: vocab_size {m.get('vocab_size')!r} does not match its tokenizer's "
                            f"{self.tokenizer.vocab_size}; prepare the dataset again")
        if m.get("dtype") not in ("uint16", "uint32"):
            raise GPT2Error(f"{path}: unknown token dtype {m.get('dtype')!r}; prepare the dataset again")
        self.dtype = np.dtype(m["dtype"])
        self.shards = {split: self._open(split) for split in SPLITS}

    def _open(self, split: str) -> list[np.memmap]:
        info = self.manifest.get("splits", {}).get(split)
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise GPT2Error(f"{self.folder / MANIFEST} lists no {split} split; prepare the dataset again")
        shards = []
        for s in info["shards"]:
            name, n = (s.get("file"), s.get("tokens")) if isinstance(s, dict) else (None, None)
            if not isinstance(name, str) or Path(name).name != name or not isinstance(n, int) or n < 1:
                raise GPT2Error(f"{self.folder / MANIFEST}: a {split} shard entry is invalid; prepare again")
            f = self.folder / name
            if not f.is_file() or f.stat().st_size != n * self.dtype.itemsize:
                raise GPT2Error(f"{f} is missing or not {n:,} tokens long (a partial copy?); prepare the "
                                "dataset again")
            shard = np.memmap(f, dtype=self.dtype, mode="r", shape=(n,))
            if n <= CHECK_IDS_UP_TO:   # (larger shards: every batch's ids are checked as it is read)
                top = max(int(shard[i:i + (1 << 24)].max()) for i in range(0, n, 1 << 24))
                if top >= self.vocab_size:
                    raise GPT2Error(f"{f} holds token id {top}, beyond the dataset's vocabulary of "
                                    f"{self.vocab_size} (a damaged shard, or a manifest edited by hand); "
                                    "prepare the dataset again")
            shards.append(shard)
        return shards

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def shard_files(self, split: str) -> list[Path]:
        return [self.folder / s["file"] for s in self.manifest["splits"][split]["shards"]]

    def num_tokens(self, split: str) -> int:
        return sum(len(s) for s in self.shards[split])

    def loader(self, split: str, batch_size: int, context_length: int, seed: int = 0) -> RandomWindows:
        if split not in SPLITS:
            raise GPT2Error(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        try:
            return RandomWindows(self.shards[split], batch_size, context_length, seed, SPLITS.index(split),
                                 vocab_size=self.vocab_size, names=[str(p) for p in self.shard_files(split)])
        except GPT2Error as exc:
            raise GPT2Error(f"{self.folder} ({split} split): {exc}") from None


class RandomWindows(EpochPosition):
    """Batches of random windows from a list of token arrays (a split's shards).

    A window never crosses from one shard into the next. Window starts are drawn uniformly over
    every start that leaves room for T + 1 tokens: in shard k there are len_k - T of them, and a
    global draw g in [0, sum_k(len_k - T)) is mapped to (shard, offset) by a search over the
    cumulative counts -- one array op per batch, however many shards.
    """

    shuffle = True   # (the DataLoader field that checkpoints record)
    KIND = "random_windows"

    def __init__(self, shards, batch_size: int, context_length: int, seed: int = 0, split_id: int = 0,
                 vocab_size: int | None = None, names=None):
        for name, v in (("batch size", batch_size), ("context length", context_length)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise GPT2Error(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise GPT2Error(f"seed must be an integer >= 0, got {seed!r}")
        self.shards = list(shards)
        self.vocab_size = vocab_size              # ids at or beyond it are refused, naming the shard
        self.names = list(names) if names is not None else [f"shard {k}" for k in range(len(self.shards))]
        self.batch_size, self.max_length = int(batch_size), int(context_length)
        self.seed, self.split_id = int(seed), int(split_id)
        counts = np.array([max(len(s) - self.max_length, 0) for s in self.shards], dtype=np.int64)
        if counts.sum() == 0:
            longest = max((len(s) for s in self.shards), default=0)
            raise GPT2Error(f"{longest} tokens is too few for one window of {self.max_length} + 1; use a "
                            "smaller --context-length or more text")
        self.num_windows = int(counts.sum())
        self._ends = np.cumsum(counts)                   # (S,) windows in shards 0..k
        self._firsts = self._ends - counts               # (S,) global index of shard k's first window
        self._offsets = np.arange(self.max_length + 1)   # (T+1,)
        self.epoch, self.batch_index = 0, 0

    # -- the batches ---------------------------------------------------------------------------
    @property
    def dataset(self):
        return self   # train() asks `loader.dataset.max_length`, as of a DataLoader

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.max_length

    def __len__(self) -> int:
        """A nominal epoch: batches that together hold as many tokens as the split."""
        return max(1, sum(len(s) for s in self.shards) // self.tokens_per_batch)

    def _windows(self, rng, n: int) -> tuple[np.ndarray, np.ndarray]:
        g = rng.integers(0, self.num_windows, size=n)                   # (n,) global window index
        shard = np.searchsorted(self._ends, g, side="right")           # (n,) which shard
        start = g - self._firsts[shard]                                # (n,) start inside it
        windows = np.empty((n, self.max_length + 1), dtype=np.int64)   # (n, T+1)
        for k in np.unique(shard):                                     # one gather per shard
            rows = shard == k
            windows[rows] = self.shards[k][start[rows][:, None] + self._offsets]
            if self.vocab_size is not None and windows[rows].max() >= self.vocab_size:
                raise GPT2Error(f"{self.names[k]} holds token id {int(windows[rows].max())}, beyond the "
                                f"dataset's vocabulary of {self.vocab_size} (a damaged shard, or a manifest "
                                "edited by hand); prepare the dataset again")
        return windows[:, :-1], windows[:, 1:]

    def get_batch(self, index: int, rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Training batch `index` (inputs, targets: int64 (B, T)); with `world_size` > 1, rank
        `rank`'s contiguous B / world_size rows of it (B must divide evenly)."""
        rng = np.random.default_rng([self.seed, self.split_id, _TRAIN_STREAM, int(index)])
        x, y = self._windows(rng, self.batch_size)
        if world_size == 1:
            return x, y
        if self.batch_size % world_size or not 0 <= rank < world_size:
            raise GPT2Error(f"a batch of {self.batch_size} cannot be split evenly over {world_size} ranks "
                            f"(rank {rank})")
        per = self.batch_size // world_size
        return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]

    def eval_batches(self, n: int, key: int = 0):
        """`n` random batches for evaluation (a stream apart from training's), fixed by `key`."""
        rng = np.random.default_rng([self.seed, self.split_id, _EVAL_STREAM, int(key)])
        for _ in range(n):
            yield self._windows(rng, self.batch_size)

    def batches(self, epoch: int | None = None, start: int = 0):
        """The rest of an epoch's batches, without moving the position (DataLoader's interface)."""
        epoch = self.epoch if epoch is None else epoch
        for i in range(start, len(self)):
            yield self.get_batch(epoch * len(self) + i)

