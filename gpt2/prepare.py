"""Prepare a corpus once: UTF-8 text -> token ids in binary shards, a train/val split and a manifest.

    python -m gpt2 prepare shakespeare --tokenizer char --out data/shakespeare_char
    python -m gpt2 prepare my_books/ --out data/books          # every file in a folder, GPT-2 BPE

    manifest = prepare(["input.txt"], "data/mine", tokenizer="char")

Training then reads the ids from disk (gpt2/dataset.py memory-maps the shards) instead of
tokenizing the text again at every start and holding it in memory. The folder holds:

    manifest.json        format version, tokenizer (with the character vocabulary for `char`),
                         token dtype, the shards of each split and their token counts, and every
                         source file's size and SHA-256
    train-00000.bin ...  the first (1 - val_fraction) of all tokens, raw little-endian ids
    val-00000.bin ...    the rest (nanoGPT's split: the last 10% of the corpus is validation)

Ids are uint16 when the vocabulary fits (GPT-2's 50,257 does: 2 bytes a token), else uint32.

Streaming: the text is read in chunks of about a megabyte and each chunk's ids are appended to a
file as soon as they exist, so a corpus larger than memory is never held whole. A chunk ends just
before a newline that is followed by a printable non-space character: GPT-2's pre-tokenizer never
joins such a newline with what follows it (and splits whitespace runs before their last newline),
so encoding chunk by chunk gives exactly the ids of encoding the whole text (tested). Large inputs
are encoded by several processes, one chunk each at a time, and written back in order.
Several files are joined with GPT-2's <|endoftext|> between them (nothing for `char`).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import GPT2Error
from .safeio import default_mode
from .tokenizer import TOKENIZERS, CharTokenizer, get_tokenizer

MANIFEST = "manifest.json"
FORMAT = "minigrad-gpt2-dataset"
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20               # read (and encode) about 1 MB at a time
SHARD_TOKENS = 100_000_000          # at most this many ids per shard file (200 MB as uint16)
PARALLEL_BYTES = 8 << 20            # inputs larger than this are encoded by several processes


# ---------------------------------------------------------------------------------------------
# Reading: files -> text chunks that end at safe places
# ---------------------------------------------------------------------------------------------

def list_sources(paths) -> list[Path]:
    """The files to read, in order: each file given, and every (non-hidden) file under each
    folder given, sorted by path. GPT2Error for a missing path or nothing to read."""
    files = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise GPT2Error(f"folder {p} has no files to prepare")
            files.extend(found)
        else:
            raise GPT2Error(f"{p} does not exist; give UTF-8 text files, folders of them, or a dataset "
                            "name (verdict, shakespeare)")
    if not files:
        raise GPT2Error("nothing to prepare: give at least one text file or folder")
    return files


def _cut(text: str) -> int | None:
    """Where to end a chunk: the index of the last newline followed by a printable non-space
    character (the chunk ends before the newline), or None if there is no such place."""
    i = text.rfind("\n", 0, len(text) - 1)
    while i > 0:
        nxt = text[i + 1]
        if not nxt.isspace() and nxt.isprintable():
            return i
        i = text.rfind("\n", 0, i)
    return None


def read_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES, on_bytes=None, hasher=None):
    """Yield the text of `path` in pieces of roughly `chunk_bytes`, each ending at a safe place.

    Reads bytes and decodes them incrementally (a multi-byte character split between two reads
    is kept for the next one), so memory stays about one chunk. `on_bytes(n)` is told how many
    bytes were read; `hasher` (hashlib) is fed the raw bytes. GPT2Error, naming the file, for
    bytes that are not UTF-8 or for NUL bytes (a binary file).
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    pending, offset = "", 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            final = not raw
            if hasher is not None and raw:
                hasher.update(raw)
            if b"\x00" in raw:
                raise GPT2Error(f"{path} looks binary (it contains NUL bytes); give UTF-8 text files")
            try:
                pending += decoder.decode(raw, final=final)
            except UnicodeDecodeError as exc:
                raise GPT2Error(f"{path} is not valid UTF-8 (near byte {offset + exc.start}); convert it, "
                                "e.g. iconv -t UTF-8") from None
            offset += len(raw)
            if on_bytes is not None and raw:
                on_bytes(len(raw))
            if final:
                if pending:
                    yield pending
                return
            cut = _cut(pending)
            if cut is None and len(pending) > 16 * chunk_bytes:
                cut = len(pending)   # no newline for 16 chunks: cut anyway (ids may differ right here)
            if cut:
                yield pending[:cut]
                pending = pending[cut:]


# ---------------------------------------------------------------------------------------------
# Encoding (in worker processes for large inputs)
# ---------------------------------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer_dict: dict) -> None:
    global _worker_tokenizer
    from .tokenizer import tokenizer_from_dict  # noqa: PLC0415

    _worker_tokenizer = tokenizer_from_dict(tokenizer_dict)


def _encode(tok, text: str) -> tuple[np.ndarray, int, int]:
    """One chunk -> (ids as uint32, its characters, its UTF-8 bytes)."""
    return np.asarray(tok.encode(text), dtype=np.uint32), len(text), len(text.encode("utf-8"))


def _encode_chunk(text: str) -> tuple[np.ndarray, int, int]:
    """`_encode` in a worker process, with the worker's own tokenizer."""
    return _encode(_worker_tokenizer, text)


def _char_vocabulary(files, progress) -> tuple[set[str], list[str]]:
    """First pass for `char`: the set of characters of every file, and their SHA-256s."""
    chars, digests = set(), []
    bar = _bar(progress, sum(f.stat().st_size for f in files), "vocabulary")
    for f in files:
        h = hashlib.sha256()
        for text in read_chunks(f, on_bytes=bar.update if bar else None, hasher=h):
            chars.update(text)
        digests.append(h.hexdigest())
    if bar is not None:
        bar.close()
    return chars, digests


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, dynamic_ncols=True,
                leave=False)


# ---------------------------------------------------------------------------------------------
# prepare()
# ---------------------------------------------------------------------------------------------

def prepare(sources, out, tokenizer: str = "gpt2", val_fraction: float = 0.1, workers: int | None = None,
            overwrite: bool = False, progress: bool = True, shard_tokens: int = SHARD_TOKENS,
            chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Tokenize the text files `sources` (files and folders) into a prepared dataset folder `out`.

    `tokenizer`: "gpt2" (BPE) or "char" (the corpus's sorted characters). `val_fraction`: the
    share of tokens, from the end, kept for validation. `workers`: processes encoding a large
    input (default: the CPU count; 1 encodes in this process). The folder is built under a
    temporary name and renamed into place when complete; an existing `out` is replaced only with
    `overwrite`, and only if it is a prepared dataset. Returns the manifest.
    """
    if tokenizer not in TOKENIZERS:
        raise GPT2Error(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 < val_fraction < 1.0:
        raise GPT2Error(f"--val-fraction must be a number in (0, 1), e.g. 0.1, got {val_fraction!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise GPT2Error(f"--workers must be a positive integer, got {workers!r}")
    for name, v in (("shard_tokens", shard_tokens), ("chunk_bytes", chunk_bytes)):
        if not isinstance(v, int) or v < 1:
            raise GPT2Error(f"{name} must be a positive integer, got {v!r}")
    files = list_sources(sources)
    out = Path(out)
    old_manifest = _check_out(out, overwrite, files)
    total_bytes = sum(f.stat().st_size for f in files)

    # 1. The tokenizer (a first pass over the text for the character vocabulary).
    digests = None
    if tokenizer == "char":
        chars, digests = _char_vocabulary(files, progress)
        if not chars:
            raise GPT2Error("the input files are empty; give some text to prepare")
        tok = CharTokenizer.from_text(chars)
    else:
        tok = get_tokenizer()
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(work, default_mode(directory=True))   # mkdtemp's is 0700: a folder like any other
        # 2. Every token, in order, appended to one file as the chunks are encoded.
        all_ids = work / "all.tmp"
        n_tokens, sources_info, seconds = _encode_files(files, tok, dtype, all_ids, workers, progress,
                                                        total_bytes, chunk_bytes)
        for i, info in enumerate(sources_info):   # the vocabulary pass read the same bytes?
            if digests is not None and info["sha256"] != digests[i]:
                raise GPT2Error(f"{files[i]} changed while it was being prepared; run prepare again")
        n_train = int(n_tokens * (1.0 - val_fraction))
        if n_train < 2 or n_tokens - n_train < 2:
            raise GPT2Error(f"the input has {n_tokens} tokens, too few to split into training and validation "
                            f"with --val-fraction {val_fraction}; give more text")
        # 3. The split, written as shards.
        ids = np.memmap(all_ids, dtype=dtype, mode="r", shape=(n_tokens,))
        splits = {"train": _write_shards(ids[:n_train], work, "train", shard_tokens),
                  "val": _write_shards(ids[n_train:], work, "val", shard_tokens)}
        del ids
        all_ids.unlink()
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "tokenizer": tok.to_dict(), "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "tokens": n_tokens, "val_fraction": val_fraction, "splits": splits,
            "document_separator": "<|endoftext|>" if tok.eot_id is not None and len(files) > 1 else None,
            "sources": sources_info, "seconds": round(seconds, 3),
        }
        text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        (work / MANIFEST).write_text(text, encoding="utf-8")
        # 4. Into place. A new folder is renamed into place whole; into an existing dataset
        # (only with --overwrite) go our new files, after our old ones are removed: the manifest
        # first (never one naming missing shards) and last. Nothing else in the folder is touched.
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            if out.exists():
                out.rmdir()
            os.replace(work, out)
        else:
            (out / MANIFEST).unlink()
            for name in _own_files(out, old_manifest):
                (out / name).unlink(missing_ok=True)
            for f in sorted(work.iterdir(), key=lambda f: f.name == MANIFEST):   # the manifest last
                os.replace(f, out / f.name)
            work.rmdir()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _own_files(out: Path, manifest: dict | None) -> list[str]:
    """The shard files a dataset's manifest lists (what prepare wrote there, and may remove)."""
    names = []
    for split in ((manifest or {}).get("splits") or {}).values():
        for shard in (split.get("shards") if isinstance(split, dict) else None) or []:
            name = shard.get("file") if isinstance(shard, dict) else None
            if isinstance(name, str) and Path(name).name == name and name.endswith(".bin"):
                names.append(name)
    return names


def _read_manifest(out: Path) -> dict | None:
    try:
        m = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def _check_out(out: Path, overwrite: bool, files=()) -> dict | None:
    """Refuse an --out that is not ours to write; returns the manifest of the dataset that
    --overwrite replaces (None for a new or empty folder)."""
    if out.exists() and not out.is_dir():
        raise GPT2Error(f"--out {out} exists and is not a folder; choose another --out")
    if not (out.is_dir() and any(out.iterdir())):
        return None
    if not (out / MANIFEST).is_file():
        raise GPT2Error(f"--out {out} is a folder that is not empty and not a prepared dataset; "
                        "choose another --out (prepare never deletes other files)")
    if not overwrite:
        raise GPT2Error(f"--out {out} already holds a prepared dataset; choose another --out, or pass "
                        "--overwrite to replace it (only the dataset's own files are replaced)")
    manifest = _read_manifest(out)
    if manifest is None:
        raise GPT2Error(f"{out / MANIFEST} is not a minigrad-gpt2 dataset manifest, so prepare cannot tell "
                        "which files are its own; choose another --out")
    ours = {out / n for n in _own_files(out, manifest)}
    for f in files:
        if f.resolve() in {p.resolve() for p in ours}:
            raise GPT2Error(f"{f} is a shard of the dataset in --out {out} that --overwrite would replace; "
                            "prepare from the text instead, or choose another --out")
    # a file the new dataset would write that the old one did not (a shard of the user's)
    clash = sorted(p.name for p in out.glob("*-*.bin") if p not in ours and p.name.split("-")[0] in
                   ("train", "val"))
    if clash:
        raise GPT2Error(f"--out {out} holds {clash[0]}, which is not a shard of its dataset and would be "
                        "replaced; move it away or choose another --out")
    return manifest


def _encode_files(files, tok, dtype, dest: Path, workers, progress, total_bytes, chunk_bytes):
    """Encode every file into `dest` (raw ids of `dtype`, appended in order). Returns the token
    count, one {path, bytes, characters, tokens, sha256} per file, and the seconds spent."""
    workers = workers or os.cpu_count() or 1
    parallel = workers > 1 and total_bytes > PARALLEL_BYTES and tok.name == "gpt2"
    bar = _bar(progress, total_bytes, "prepare")
    pool = (multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tok.to_dict(),))
            if parallel else None)
    t0, n_total, info = time.perf_counter(), 0, []
    try:
        with open(dest, "wb") as sink:
            for k, f in enumerate(files):
                h = hashlib.sha256()
                chunks = read_chunks(f, chunk_bytes, hasher=h)
                if pool is not None:   # imap keeps the chunks' order; a few in flight per worker
                    encoded = pool.imap(_encode_chunk, chunks, chunksize=1)
                else:
                    encoded = (_encode(tok, c) for c in chunks)
                n_file = n_chars = 0
                if k > 0 and tok.eot_id is not None:   # documents separated by <|endoftext|>
                    np.asarray([tok.eot_id], dtype=dtype).tofile(sink)
                    n_total += 1
                for ids, n_c, n_b in encoded:
                    ids.astype(dtype).tofile(sink)
                    n_file += len(ids)
                    n_chars += n_c
                    if bar is not None:
                        bar.update(n_b)
                        rate = (n_total + n_file) / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix_str(f"{n_total + n_file:,} tokens, {rate:,.0f} tokens/s",
                                            refresh=False)
                n_total += n_file
                info.append({"path": str(f), "bytes": f.stat().st_size, "characters": n_chars,
                             "tokens": n_file, "sha256": h.hexdigest()})
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    return n_total, info, time.perf_counter() - t0


def _write_shards(ids: np.ndarray, folder: Path, split: str, shard_tokens: int) -> dict:
    """Copy `ids` into files of at most `shard_tokens` ids each; returns {tokens, shards}."""
    shards = []
    for k, start in enumerate(range(0, len(ids), shard_tokens)):
        name = f"{split}-{k:05d}.bin"
        piece = ids[start:start + shard_tokens]
        with open(folder / name, "wb") as f:
            for s in range(0, len(piece), 1 << 20):    # 1M ids at a time: bounded memory
                np.ascontiguousarray(piece[s:s + (1 << 20)]).tofile(f)
        shards.append({"file": name, "tokens": len(piece)})
    return {"tokens": len(ids), "shards": shards}
