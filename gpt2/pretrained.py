"""OpenAI's pretrained GPT-2 weights: download, load into a `GPTModel`, and export ours back.

    from gpt2.pretrained import load_pretrained, export_hf
    model = load_pretrained("gpt2")                 # 124M; or gpt2-medium, gpt2-large, gpt2-xl
    model = load_pretrained("path/to/dir")          # any directory in the Hugging Face layout
    export_hf(model, "out/my-gpt2")                 # config.json + model.safetensors for transformers

A name means the files config.json and model.safetensors of https://huggingface.co/openai-community/<name>,
found or fetched in this order:

1. our own cache, `~/.cache/minigrad-gpt2/<name>/` (GPT2_CACHE, or `cache_dir`, to use another):
   a model already there loads without touching the network;
2. with `huggingface_hub` installed (the `hub` extra), `huggingface_hub.hf_hub_download` into the
   Hugging Face cache (HF_HOME / HF_HUB_CACHE, shared with transformers and every other HF tool),
   from HF_ENDPOINT (a mirror) if set, and from the cache alone under HF_HUB_OFFLINE=1;
3. otherwise -- or when `cache_dir` is given, or GPT2_HUB=0 -- a direct download into our cache:
   each file is written to a hidden temporary file beside it, flushed to disk, and only then
   renamed to its real name (gpt2/safeio.py), so an interrupted download never leaves a file
   that looks complete.

GPT2_HUB=1 insists on huggingface_hub (an error if it is missing). GPT2_OFFLINE=1 forbids every
download attempt (both ways). Every failure is one GPT2Error saying what to do: what to download
and where to put it, that offline mode is on, that a mirror lacks the repository, or which damaged
file to delete.

Weights are read with safetensors (never pickle). The name and layout mapping is `gpt2/hf.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from minigrad import backend as mg_backend
from minigrad import nn

from . import hf, safeio
from .errors import GPT2Error
from .model import GPTModel, build_uninitialised

# name -> approximate size of model.safetensors (for the messages)
PRETRAINED = {"gpt2": "548 MB", "gpt2-medium": "1.5 GB", "gpt2-large": "3.3 GB", "gpt2-xl": "6.4 GB"}
ALIASES = {"gpt2-124m": "gpt2", "gpt2-small": "gpt2"}
HUB_URL = "https://huggingface.co/openai-community/{name}/resolve/main/{file}"
HUB_REPO = "openai-community/{name}"
FILES = ("config.json", "model.safetensors")
DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


# ---------------------------------------------------------------------------------------------
# Where the files live, and fetching them
# ---------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """$GPT2_CACHE if set, else ~/.cache/minigrad-gpt2."""
    env = os.environ.get("GPT2_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minigrad-gpt2"


def canonical_name(name: str) -> str | None:
    """'gpt2', 'openai-community/gpt2-xl', 'gpt2-124m' -> the hub name; None if not one of ours."""
    name = name.removeprefix("openai-community/")
    name = ALIASES.get(name, name)
    return name if name in PRETRAINED else None


def model_dir(name: str, cache_dir=None) -> Path:
    """The directory the files of pretrained model `name` are (or will be) cached in."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / name


def file_urls(name: str) -> list[str]:
    return [HUB_URL.format(name=name, file=f) for f in FILES]


def download_instructions(name: str, cache_dir=None) -> str:
    """What to download, from where, and where to put it (for users without network access)."""
    dest = model_dir(name, cache_dir)
    urls = "\n".join(f"    {u}" for u in file_urls(name))
    return (f"To use OpenAI's {name} weights without network access, download these two files\n"
            f"(model.safetensors is about {PRETRAINED[name]}) on a machine that has it:\n{urls}\n"
            f"and put them in the cache directory\n    {dest}/\n"
            f"(set GPT2_CACHE to use another cache root), or in any directory and pass that directory\n"
            f"instead of the name: load_pretrained(DIR), or python -m gpt2 generate --pretrained DIR.")


def ensure_downloaded(name: str, cache_dir=None, progress: bool = True) -> Path:
    """The cache directory of pretrained model `name`, downloading whichever file is missing.

    A file that exists under its real name is complete (downloads are renamed into place only
    when finished), so it is never downloaded again; a leftover `.part` file is started over.
    """
    dest = model_dir(name, cache_dir)
    missing = [f for f in FILES if not (dest / f).is_file()]
    if not missing:
        return dest
    if os.environ.get("GPT2_OFFLINE", "") not in ("", "0"):
        raise GPT2Error(f"{name} is not in the cache and GPT2_OFFLINE is set. "
                        + _one_line(download_instructions(name, cache_dir)))
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GPT2Error(f"cannot create the cache directory {dest} ({exc}); set GPT2_CACHE or pass "
                        "cache_dir to use another") from None
    for f in missing:
        download_file(HUB_URL.format(name=name, file=f), dest / f, progress=progress,
                      hint=download_instructions(name, cache_dir))
    return dest


def download_file(url: str, dest: Path, progress: bool = True, hint: str = "") -> None:
    """Fetch `url` into `dest` atomically (safeio.atomic_write: a hidden temporary file beside
    it, fsynced, then renamed): an interrupted download leaves nothing under the real name."""
    from tqdm import tqdm  # noqa: PLC0415 - only needed when downloading

    dest = Path(dest)

    def fetch(tmp) -> None:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            got = 0
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                            desc=f"downloading {dest.name}", disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if total is not None and got != total:
            raise GPT2Error(f"download of {url} stopped after {got:,} of {total:,} bytes; run again to retry")

    try:
        safeio.atomic_write(dest, fetch)
    except (urllib.error.URLError, OSError, ValueError) as exc:  # no network, HTTP errors, disk full
        reason = getattr(exc, "reason", None) or exc
        raise GPT2Error(f"could not download {url} ({reason}). " + _one_line(hint)) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# Through huggingface_hub: the Hugging Face cache, HF_ENDPOINT, HF_HUB_OFFLINE
# ---------------------------------------------------------------------------------------------

def hub_setting() -> bool | None:
    """$GPT2_HUB: True (1: always through huggingface_hub), False (0: never), None (unset or
    'auto': through huggingface_hub when it is installed)."""
    value = os.environ.get("GPT2_HUB", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise GPT2Error(f"GPT2_HUB must be 1 (download through huggingface_hub), 0 (download directly) or "
                    f"auto (the default: huggingface_hub when installed), got {value!r}")


def _import_hub():
    """The huggingface_hub module, or None where it is not installed."""
    try:
        import huggingface_hub  # noqa: PLC0415 - optional, only for downloads
    except ImportError:
        return None
    return huggingface_hub


def uses_hub(cache_dir=None) -> bool:
    """Whether a name missing from our cache is fetched through huggingface_hub (see the module
    docstring): not when `cache_dir` names our cache, nor under GPT2_HUB=0; GPT2_HUB=1 insists."""
    setting = hub_setting()
    if cache_dir is not None or setting is False:
        return False
    if _import_hub() is not None:
        return True
    if setting:
        raise GPT2Error("GPT2_HUB=1 but huggingface_hub is not installed: pip install 'minigrad-gpt2[hub]' "
                        "(or pip install huggingface_hub), or unset GPT2_HUB to download directly")
    return False


def hub_download(name: str, progress: bool = True) -> Path:
    """The Hugging Face cache's snapshot directory holding config.json and model.safetensors of
    openai-community/`name`, fetched with `huggingface_hub.hf_hub_download` where missing.

    config.json is asked for first (at "main"), and model.safetensors then at the commit that
    config.json came from, so both files are always of the same revision. huggingface_hub reads
    HF_HOME / HF_HUB_CACHE, HF_ENDPOINT and HF_HUB_OFFLINE itself (when it is imported);
    GPT2_OFFLINE=1 makes it use the cache only, too.
    """
    hub = _import_hub()
    if hub is None:
        raise GPT2Error("huggingface_hub is not installed: pip install 'minigrad-gpt2[hub]'")
    offline = _gpt2_offline()
    directory = None
    with contextlib.ExitStack() as stack:
        if not progress:
            stack.enter_context(_hub_progress_bars_off())
        for filename in FILES:
            revision = directory.name if directory is not None and _COMMIT.fullmatch(directory.name) else None
            try:
                path = Path(hub.hf_hub_download(HUB_REPO.format(name=name), filename, revision=revision,
                                                local_files_only=offline))
            except Exception as exc:  # noqa: BLE001 - every failure becomes one GPT2Error naming the fix
                raise GPT2Error(_hub_error(name, filename, exc, offline)) from None
            directory = directory or path.parent
    return directory


_COMMIT = re.compile(r"[0-9a-f]{40}")


def _gpt2_offline() -> bool:
    return os.environ.get("GPT2_OFFLINE", "") not in ("", "0")


@contextlib.contextmanager
def _hub_progress_bars_off():
    from huggingface_hub import utils  # noqa: PLC0415

    was_off = utils.are_progress_bars_disabled()
    utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            utils.enable_progress_bars()


def _hub_error(name: str, filename: str, exc: Exception, gpt2_offline: bool) -> str:
    """One line for a failed hf_hub_download: what happened and what to do."""
    import huggingface_hub  # noqa: PLC0415
    from huggingface_hub import constants, utils  # noqa: PLC0415

    def classes(*names):
        return tuple(c for c in (getattr(utils, n, None) for n in names) if isinstance(c, type))

    repo = HUB_REPO.format(name=name)
    endpoint = constants.ENDPOINT + (" (HF_ENDPOINT)" if os.environ.get("HF_ENDPOINT") else "")
    cache = constants.HF_HUB_CACHE
    version = tuple(int(v) for v in re.findall(r"\d+", huggingface_hub.__version__)[:2])
    command = f"{'hf' if version >= (0, 34) else 'huggingface-cli'} download {repo} {' '.join(FILES)}"
    elsewhere = (f"or put config.json and model.safetensors (from {' and '.join(file_urls(name))}) in any "
                 "directory and pass that directory instead of the name")
    hf_offline = bool(getattr(constants, "HF_HUB_OFFLINE", False))
    not_cached = classes("LocalEntryNotFoundError", "OfflineModeIsEnabled")
    if isinstance(exc, not_cached) and (gpt2_offline or hf_offline):
        switch = "GPT2_OFFLINE" if gpt2_offline else "HF_HUB_OFFLINE"
        return (f"OpenAI's {name} weights ({repo}: {filename}) are not in the Hugging Face cache {cache} "
                f"and offline mode is on ({switch}=1): run `{command}` where there is network access "
                f"(with the same HF_HUB_CACHE), or unset {switch}, {elsewhere}")
    if isinstance(exc, classes("LocalEntryNotFoundError")):  # no answer from the endpoint, nothing cached
        cause = exc.__cause__ or exc.__context__ or exc
        return (f"could not download {filename} of {repo} from {endpoint} ({_short(cause)}): check the "
                f"network connection (or HF_ENDPOINT), set HF_HUB_OFFLINE=1 to use only the Hugging Face "
                f"cache {cache}, {elsewhere}")
    if isinstance(exc, classes("RepositoryNotFoundError")):
        fix = ("check that the mirror holds the openai-community repositories, or unset HF_ENDPOINT to use "
               "huggingface.co" if os.environ.get("HF_ENDPOINT") else
               "check the token (HF_TOKEN) and proxy settings")
        return f"{repo} was not found at {endpoint} ({_status(exc)}): {fix}, {elsewhere}"
    if isinstance(exc, classes("RevisionNotFoundError", "EntryNotFoundError")):
        return f"{endpoint} has no {filename} in {repo} ({_status(exc)}): {elsewhere}"
    if isinstance(exc, classes("HfHubHTTPError")):
        return f"{endpoint} refused {filename} of {repo} ({_short(exc)}): try again later, {elsewhere}"
    return (f"downloading {filename} of {repo} from {endpoint} into {cache} failed ({type(exc).__name__}: "
            f"{_short(exc)}); run again to retry, {elsewhere}")


def _status(exc: BaseException) -> str:
    """'HTTP 401' for an error that carries the response, else the error's first line."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP {status}" if status is not None else _short(exc)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = _one_line(str(exc)) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _hf_cache_hint(directory: Path, message: str) -> str | None:
    """For a damaged file in the Hugging Face cache: the blob to delete (deleting the snapshot's
    link alone would not help: huggingface_hub would link the same blob again)."""
    if directory.parent.name != "snapshots" or not directory.parent.parent.name.startswith("models--"):
        return None
    for filename in FILES:
        path = directory / filename
        if str(path) in message and path.is_symlink():
            return (f"here it is a link into the Hugging Face cache, so delete the file it points to, "
                    f"{path.resolve()}, and load again to download it afresh")
    return None


def _find(name: str, cache_dir=None, progress: bool = True) -> Path:
    """A pretrained model's directory: our cache if complete there, else through huggingface_hub
    or a direct download (see the module docstring)."""
    dest = model_dir(name, cache_dir)
    if all((dest / f).is_file() for f in FILES):
        return dest
    if uses_hub(cache_dir):
        return hub_download(name, progress=progress)
    return ensure_downloaded(name, cache_dir, progress=progress)


def resolve(name_or_dir, cache_dir=None, progress: bool = True) -> Path:
    """A pretrained model name (downloaded if needed) or a local directory -> the directory."""
    name_or_dir = os.fspath(name_or_dir)
    name = canonical_name(name_or_dir)
    if name is not None:
        return _find(name, cache_dir, progress=progress)
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise GPT2Error(f"{name_or_dir} is a file; give the directory that holds config.json and "
                        "model.safetensors")
    looks_like_path = os.sep in name_or_dir or name_or_dir.startswith((".", "~"))
    if looks_like_path:
        raise GPT2Error(f"directory {name_or_dir} does not exist")
    raise GPT2Error(f"unknown pretrained model {name_or_dir!r}: choose one of {', '.join(PRETRAINED)}, "
                    "or give a directory holding config.json and model.safetensors (Hugging Face layout)")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_pretrained(name_or_dir, backend=None, dtype="float32", cache_dir=None) -> GPTModel:
    """A GPTModel with OpenAI's GPT-2 weights (a name) or those of a Hugging Face-layout directory.

    name_or_dir: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl" (from our cache, else downloaded
        once through huggingface_hub into the Hugging Face cache when it is installed, else into
        our cache; see the module docstring), or a directory with config.json and
        model.safetensors, as transformers' `save_pretrained` (or our `export_hf`) writes them.
        Names win over directories: write "./gpt2" for a local directory called gpt2.
    backend: "numpy" or "cupy" to switch minigrad's backend first (it is global: the model's
        arrays and every later op live there); None keeps the current one.
    dtype: "float32" (default), "float64" (e.g. for gradient checks) or "float16".
    cache_dir: our cache root (default $GPT2_CACHE or ~/.cache/minigrad-gpt2); given, a missing
        name is downloaded directly into it, not through huggingface_hub.

    The model comes back in eval mode (dropout off), as transformers' from_pretrained does;
    call `model.train()` to fine-tune it. Any problem with the files is a GPT2Error naming it.
    """
    dtype = _check_dtype(dtype)
    if backend is not None:
        try:
            mg_backend.set_backend(backend)
        except mg_backend.BackendError as exc:
            raise GPT2Error(str(exc)) from None
    directory = resolve(name_or_dir, cache_dir)
    try:
        return _load_dir(directory, dtype)
    except GPT2Error as exc:
        hint = _hf_cache_hint(Path(directory), str(exc))
        if hint is None:
            raise
        raise GPT2Error(f"{exc}; {hint}") from None


def _check_dtype(dtype):
    try:
        dt = np.dtype(dtype).type
    except TypeError:
        dt = None
    if dt not in DTYPES.values():
        raise GPT2Error(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dt


def read_config(directory: Path) -> tuple:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise GPT2Error(f"no config.json in {directory} (expected the Hugging Face layout: config.json "
                        "and model.safetensors)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise GPT2Error(f"cannot read {path}: {exc}") from None
    try:
        return hf.config_from_hf(d, source=str(path))
    except (TypeError, ValueError, AttributeError, OverflowError) as exc:  # e.g. "n_embd": [1]
        raise GPT2Error(f"{path}: a field has a value of the wrong type ({exc})") from None


def _weights_path(directory: Path) -> Path:
    path = directory / "model.safetensors"
    if not path.is_file():
        other = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.index.json")]
        extra = (f"; found {', '.join(sorted(other))}, which we do not read (pickle files and sharded "
                 "checkpoints): convert to a single model.safetensors") if other else ""
        raise GPT2Error(f"no model.safetensors in {directory}{extra}")
    return path


def _load_dir(directory: Path, dtype) -> GPTModel:
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    directory = Path(directory)
    config, eps = read_config(directory)
    path = _weights_path(directory)
    # Check everything the header can tell before allocating anything: completeness, names,
    # shapes, dtypes. Each problem is one GPT2Error naming the tensor.
    header = hf.read_safetensors_header(path)
    source = str(path)
    matched = hf.match_tensors({n: shape for n, (_, shape, _) in header.items()}, config, source)
    for _, name in matched.values():
        if header[name][0] not in hf.SAFETENSORS_DTYPES:
            raise GPT2Error(f"tensor {name!r} in {source} has dtype {header[name][0]}, which we cannot "
                            f"read; supported: {', '.join(hf.SAFETENSORS_DTYPES)}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            if not config.qkv_bias:
                # Our own export of a model without qkv bias: zeros were written; if someone has
                # since trained them (e.g. in transformers), keep them.
                biases = [f.get_tensor(name) for spec, name in matched.values()
                          if spec.ours.endswith("attn.qkv.bias")]
                if any(np.any(b != 0) for b in biases):
                    config = config.replace(qkv_bias=True)
            model = build_uninitialised(config)
            params = dict(model.named_parameters())
            unmapped = (set(params) - set(matched)) | {
                n for n in set(matched) - set(params) if not n.endswith("attn.qkv.bias") or config.qkv_bias}
            if unmapped:  # a bug, not a user error: the model and gpt2/hf.py disagree
                raise RuntimeError(f"gpt2/hf.py does not match GPTModel's parameters: {sorted(unmapped)[:5]}")
            for ours, (spec, name) in matched.items():
                if ours not in params:
                    continue  # the zero qkv biases of a model without them
                array = hf.to_ours(f.get_tensor(name), spec)
                if not np.isfinite(array).all():
                    raise GPT2Error(f"tensor {name!r} in {source} contains NaN or infinity")
                params[ours].data = mg_backend.asarray(array, dtype=dtype)
    except SafetensorError as exc:
        raise GPT2Error(f"cannot read {source} ({exc}): delete it and download it again") from None
    if eps != 1e-5:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Exporting
# ---------------------------------------------------------------------------------------------

def export_hf(model: GPTModel, directory, dtype=None) -> Path:
    """Write `model` as config.json + model.safetensors in the Hugging Face GPT2LMHeadModel layout.

    transformers loads the result with `GPT2LMHeadModel.from_pretrained(directory)`, and
    `load_pretrained(directory)` gives back exactly the same model. Names carry the
    `transformer.` prefix and Conv1D weights are stored [in, out], as save_pretrained writes
    them. A model without qkv bias gets zero c_attn biases; an untied head is written as
    lm_head.weight with tie_word_embeddings=false (see gpt2/hf.py). `dtype` (default: the
    model's) may be "float32" to export a float64 model for use elsewhere.
    """
    from safetensors.numpy import save_file  # noqa: PLC0415

    if not isinstance(model, GPTModel):
        raise GPT2Error(f"export_hf needs a GPTModel, got {type(model).__name__}")
    config = model.config
    state = model.state_dict()
    out_dtype = _check_dtype(dtype if dtype is not None else np.dtype(state["tok_emb.weight"].dtype))
    tensors = {}
    for spec in hf.tensor_specs(config):
        if spec.ours in state:
            array = mg_backend.to_numpy(state[spec.ours])
        elif spec.ours.endswith("attn.qkv.bias") and not config.qkv_bias:
            array = np.zeros(spec.hf_shape)
        else:
            raise RuntimeError(f"GPTModel has no parameter {spec.ours} (gpt2/hf.py is out of date)")
        tensors[hf.hf_file_name(spec)] = hf.to_hf(array.astype(out_dtype, copy=False), spec)
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        hf_config = hf.config_to_hf(config, float(model.ln_f.eps), np.dtype(out_dtype).name)
        safeio.write_text(directory / "config.json", json.dumps(hf_config, indent=2) + "\n")
        safeio.atomic_write(directory / "model.safetensors",
                            lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    except OSError as exc:
        raise GPT2Error(f"cannot write {directory}: {exc}") from None
    return directory
