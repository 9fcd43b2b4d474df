"""OpenAI's weights through huggingface_hub (gpt2/pretrained.py), with no network.

Two stand-ins for huggingface.co, both built here around a small model of ours exported with
`export_hf` (13 MB: GPT-2's vocabulary, one block):

- a Hugging Face cache written by hand in huggingface_hub's exact layout
  (models--openai-community--gpt2/{blobs,refs/main,snapshots/<commit>/}), loaded with
  HF_HUB_OFFLINE=1; the download test checks that huggingface_hub itself writes the same layout;
- `FakeHub`, two HTTP servers on 127.0.0.1 answering what huggingface_hub asks the Hub's resolve
  endpoint: `HEAD/GET /{repo_id}/resolve/{revision}/{filename}` with X-Repo-Commit and ETag (the
  git blob id) for config.json; a 302 to a second server (the "CDN", another origin) with
  X-Linked-Etag (the sha256) and X-Linked-Size for model.safetensors, the LFS file; Range
  requests answered 206 with Content-Range; X-Error-Code on 401/404 as the Hub sends them.

huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once, when it is imported, so
every load through it runs in a fresh Python process with those set. The models it loads must
give exactly the logits of the exported model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import minigrad as mg
from gpt2 import pretrained
from gpt2.config import GPTConfig
from gpt2.errors import GPT2Error
from gpt2.model import GPTModel
from gpt2.pretrained import export_hf, load_pretrained

REPO = Path(__file__).resolve().parent.parent
REPO_ID = "openai-community/gpt2"
COMMIT = "607a30d783dfa663caf39e06633721c8d4cfcd7e"   # any 40 hex digits
LFS = {"model.safetensors"}                           # stored with git LFS on the Hub (config.json is not)
IDS = np.array([[3, 17, 50256, 0, 5, 5, 42, 9, 1, 33, 12],
                [59, 2, 2, 8, 40, 11, 7, 0, 30, 21, 4]])

needs_hub = pytest.mark.skipif(importlib.util.find_spec("huggingface_hub") is None,
                               reason="needs huggingface_hub (the hub extra: "
                               "pip install 'minigrad-gpt2[hub]')")


# ---------------------------------------------------------------------------------------------
# The model, and the Hugging Face cache layout
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(directory written by export_hf, {file name: bytes}, the model's logits for IDS). The
    weights file (13 MB) is larger than huggingface_hub's 10 MB read chunk, so a connection
    dropped after 11 MB can be resumed mid-file."""
    config = GPTConfig(vocab_size=50257, context_length=32, emb_dim=64, n_heads=2, n_layers=1)
    model = GPTModel(config)
    for p in model.parameters():   # biases and layer norms away from 0 and 1
        p.data = p.data + mg.backend.rng().normal(p.shape, std=0.1)
    model.eval()
    with mg.no_grad():
        logits = model(IDS).data
    out = export_hf(model, tmp_path_factory.mktemp("exported") / "tiny-gpt2")
    files = {f: (out / f).read_bytes() for f in pretrained.FILES}
    assert len(files["model.safetensors"]) > 11 << 20
    return out, files, logits


def git_blob_id(data: bytes) -> str:
    """What the Hub sends as the ETag of a file kept in git (not LFS): git's blob id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def blob_name(filename: str, data: bytes) -> str:
    """The name huggingface_hub gives the blob: the sha256 for LFS files, the git blob id otherwise."""
    return hashlib.sha256(data).hexdigest() if filename in LFS else git_blob_id(data)


def build_hf_cache(cache: Path, files: dict, repo_id=REPO_ID, commit=COMMIT) -> Path:
    """huggingface_hub's cache layout, by hand: blobs/<hash>, refs/main (the commit, no newline),
    snapshots/<commit>/<file> -> ../../blobs/<hash>."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "blobs").mkdir()
    (root / "snapshots" / commit).mkdir(parents=True)
    for filename, data in files.items():
        name = blob_name(filename, data)
        (root / "blobs" / name).write_bytes(data)
        (root / "snapshots" / commit / filename).symlink_to(Path("..") / ".." / "blobs" / name)
    return root


def layout(root: Path) -> dict:
    """What the cache of one repository holds: files with their bytes' sha256, links with their
    targets (the lock files and probes of huggingface_hub outside `root` are not looked at)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------
# A stand-in for the Hub: its resolve endpoint and a CDN on another origin
# ---------------------------------------------------------------------------------------------

class FakeHub:
    """Answers huggingface_hub's requests for `repos` ({repo_id: {filename: bytes}}), all at COMMIT.

    log: (server, method, path, Range header) of every request. drop_after: {filename: n}, the
    next GET of that file sends all its headers and then only n bytes before closing the
    connection (once). size_lie: {filename: n}, announce n bytes more in X-Linked-Size than the
    file has. not_a_hub: answer without X-Repo-Commit, like a web server that is not a Hub.
    """

    def __init__(self, repos: dict):
        self.repos = repos
        self.blobs = {hashlib.sha256(d).hexdigest(): (f, d)
                      for files in repos.values() for f, d in files.items()}
        self.log, self.drop_after, self.size_lie, self.not_a_hub = [], {}, {}, False
        self.lock = threading.Lock()
        self.servers = {role: ThreadingHTTPServer(("127.0.0.1", 0), self._handler(role))
                        for role in ("hub", "cdn")}
        for server in self.servers.values():
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, role: str) -> str:
        return f"http://127.0.0.1:{self.servers[role].server_address[1]}"

    @property
    def endpoint(self) -> str:
        return self.url("hub")

    def close(self) -> None:
        for server in self.servers.values():
            server.shutdown()
            server.server_close()

    def requests(self, server=None) -> list:
        with self.lock:
            return [r for r in self.log if server is None or r[0] == server]

    def _handler(self, role: str):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                with hub.lock:
                    hub.log.append((role, self.command, self.path, self.headers.get("Range")))
                if role == "hub":
                    self.resolve(body)
                else:
                    self.cdn(body)

            def send(self, status: int, headers: dict, data: bytes = b"", body: bool = True, cut=None):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body and data:
                    self.wfile.write(data if cut is None else data[:cut])
                if cut is not None:
                    self.wfile.flush()
                    self.close_connection = True

            def error(self, status: int, code: str, message: str, body: bool, **extra):
                self.send(status, {"X-Error-Code": code, "X-Error-Message": message,
                                   "Content-Type": "application/json", **extra},
                          b'{"error":"%s"}' % message.encode(), body)

            def resolve(self, body: bool):
                path = urllib.parse.urlsplit(self.path).path
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not m:
                    return self.send(404, {}, b"not found", body)
                repo_id, revision, filename = (urllib.parse.unquote(g) for g in m.groups())
                if repo_id not in hub.repos:   # what the Hub answers for a missing (or private) repo
                    return self.error(401, "RepoNotFound", "Invalid username or password.", body)
                if revision not in ("main", COMMIT):
                    return self.error(404, "RevisionNotFound", "Invalid rev id: " + revision, body)
                files = hub.repos[repo_id]
                if filename not in files:
                    return self.error(404, "EntryNotFound", f"{filename} does not exist on main", body,
                                      **{"X-Repo-Commit": COMMIT})
                data = files[filename]
                headers = {} if hub.not_a_hub else {"X-Repo-Commit": COMMIT}
                if filename in LFS:    # the Hub redirects to its CDN and names the LFS object
                    sha = hashlib.sha256(data).hexdigest()
                    pointer = (f"version https://git-lfs.github.com/spec/v1\n"
                               f"oid sha256:{sha}\nsize {len(data)}\n")
                    size = len(data) + hub.size_lie.get(filename, 0)
                    headers.update({"Location": f"{hub.url('cdn')}/repos/{sha[:2]}/{sha[2:4]}/{sha}",
                                    "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(size),
                                    "ETag": f'"{git_blob_id(pointer.encode())}"'})
                    return self.send(302, headers, b"", body)
                headers.update({"ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes",
                                "Content-Type": "text/plain; charset=utf-8"})
                self.ranged(headers, data, body, filename)

            def cdn(self, body: bool):
                sha = urllib.parse.urlsplit(self.path).path.rsplit("/", 1)[-1]
                if sha not in hub.blobs:
                    return self.send(404, {}, b"no such object", body)
                filename, data = hub.blobs[sha]
                self.ranged({"ETag": f'"{sha}"', "Accept-Ranges": "bytes",
                             "Content-Type": "application/octet-stream"}, data, body, filename)

            def ranged(self, headers: dict, data: bytes, body: bool, filename: str):
                status, total = 200, len(data)
                wanted = self.headers.get("Range")
                if wanted:
                    m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
                    start = int(m.group(1)) if m else total
                    end = min(int(m.group(2)), total - 1) if m and m.group(2) else total - 1
                    if start >= total or start > end:
                        return self.send(416, {"Content-Range": f"bytes */{total}"}, b"", body)
                    status, data = 206, data[start:end + 1]
                    headers = {**headers, "Content-Range": f"bytes {start}-{end}/{total}"}
                cut = None
                if body:
                    with hub.lock:
                        cut = hub.drop_after.pop(filename, None)
                self.send(status, headers, data, body, cut=cut)

        return Handler


@pytest.fixture
def fake_hub(exported):
    _, files, _ = exported
    hub = FakeHub({REPO_ID: files})
    yield hub
    hub.close()


# ---------------------------------------------------------------------------------------------
# Loading in a fresh process, with huggingface_hub configured by the environment
# ---------------------------------------------------------------------------------------------

LOAD = """
import sys
import numpy as np
import minigrad as mg
from gpt2.errors import GPT2Error
from gpt2.pretrained import load_pretrained
try:
    model = load_pretrained(sys.argv[1])
except GPT2Error as exc:
    print(f"GPT2Error: {exc}", file=sys.stderr)
    sys.exit(2)
with mg.no_grad():
    np.save(sys.argv[2], model(np.array(IDS)).data)
""".replace("IDS", repr(IDS.tolist()))


def hub_env(tmp_path: Path, endpoint: str, **extra) -> dict:
    """A clean environment: no HF_/GPT2_ variables or proxies of the caller's, every cache in tmp_path."""
    drop = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "GPT2_", "http_proxy", "https_proxy", "all_proxy")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(tuple(d.upper() for d in drop))}
    env.update({
        "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "MINIGRAD_BACKEND": "numpy", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "GPT2_CACHE": str(tmp_path / "our-cache"), "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    })
    env.update(extra)
    return env


def load(name: str, env: dict, tmp_path: Path):
    """(logits or None, stderr) of load_pretrained(name) in a new process."""
    out = tmp_path / "logits.npy"
    out.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-c", LOAD, name, str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    if r.returncode == 0:
        return np.load(out), r.stderr
    assert r.returncode == 2, r.stderr[-3000:]   # a GPT2Error, not a traceback
    return None, r.stderr


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("GPT2Error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def unused_port() -> int:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()
    return port


# ---------------------------------------------------------------------------------------------
# Offline: the user's existing Hugging Face cache
# ---------------------------------------------------------------------------------------------

@needs_hub
def test_offline_load_from_an_existing_hf_cache(tmp_path, exported):
    _, files, logits = exported
    build_hf_cache(tmp_path / "hf-cache", files)
    env = hub_env(tmp_path, f"http://127.0.0.1:{unused_port()}", HF_HUB_OFFLINE="1")
    for name in ("gpt2", "openai-community/gpt2"):
        got, err = load(name, env, tmp_path)
        assert got is not None, err
        np.testing.assert_array_equal(got, logits)
    assert not (tmp_path / "our-cache").exists()   # nothing copied into our cache


@needs_hub
@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "GPT2_OFFLINE"])
def test_offline_and_not_cached_is_one_line_saying_what_to_download(tmp_path, fake_hub, switch):
    env = hub_env(tmp_path, fake_hub.endpoint, **{switch: "1"})
    got, err = load("gpt2-medium", env, tmp_path)
    msg = one_line_error(err)
    assert got is None and fake_hub.requests() == []
    assert f"offline mode is on ({switch}=1)" in msg
    assert "download openai-community/gpt2-medium config.json model.safetensors" in msg
    assert str(tmp_path / "hf-cache") in msg and "pass that directory" in msg


@needs_hub
def test_cli_offline_error(tmp_path, fake_hub):
    env = hub_env(tmp_path, fake_hub.endpoint, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "gpt2", "generate", "--pretrained", "gpt2-xl",
                        "--prompt", "Hi"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "HF_HUB_OFFLINE=1" in lines[0], r.stderr
    assert "openai-community/gpt2-xl" in lines[0]


# ---------------------------------------------------------------------------------------------
# Downloads from the fake endpoint
# ---------------------------------------------------------------------------------------------

@needs_hub
def test_download_through_hf_endpoint_then_from_cache(tmp_path, exported, fake_hub):
    _, files, logits = exported
    env = hub_env(tmp_path, fake_hub.endpoint)
    got, err = load("gpt2", env, tmp_path)
    assert got is not None, err
    np.testing.assert_array_equal(got, logits)
    sha = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert fake_hub.requests() == [
        ("hub", "HEAD", f"/{REPO_ID}/resolve/main/config.json", None),
        ("hub", "GET", f"/{REPO_ID}/resolve/main/config.json", None),
        # pinned to the commit config.json came from
        ("hub", "HEAD", f"/{REPO_ID}/resolve/{COMMIT}/model.safetensors", None),
        ("cdn", "GET", f"/repos/{sha[:2]}/{sha[2:4]}/{sha}", None),
    ]
    # huggingface_hub wrote exactly the layout the offline tests build by hand
    written = tmp_path / "hf-cache" / "models--openai-community--gpt2"
    assert layout(written) == layout(build_hf_cache(tmp_path / "by-hand", files))
    assert not (tmp_path / "our-cache").exists()
    # Again: from the Hugging Face cache; huggingface_hub only asks whether main has moved.
    fake_hub.log.clear()
    got, err = load("gpt2", env, tmp_path)
    np.testing.assert_array_equal(got, logits)
    assert [r[1] for r in fake_hub.requests()] == ["HEAD"]


@needs_hub
def test_dropped_connection_resumes_where_it_stopped(tmp_path, exported, fake_hub):
    """huggingface_hub >= 1.20 resumes within the call; up to 1.17 the call fails, keeping the
    partial file, and the next one resumes from it. Either way the bytes received are not
    fetched again. (1.18 and 1.19 do neither: this test fails there.)"""
    _, files, logits = exported
    fake_hub.drop_after["model.safetensors"] = 11 << 20
    env = hub_env(tmp_path, fake_hub.endpoint)
    got, err = load("gpt2", env, tmp_path)
    if got is None:
        assert "run again to retry" in one_line_error(err)
        got, err = load("gpt2", env, tmp_path)
    assert got is not None, err
    np.testing.assert_array_equal(got, logits)
    gets = [r for r in fake_hub.requests("cdn") if r[1] == "GET"]
    assert len(gets) == 2 and gets[0][3] is None
    start = int(re.fullmatch(r"bytes=(\d+)-", gets[1][3]).group(1))
    assert 0 < start <= 11 << 20          # the retry asked only for the rest
    blob = tmp_path / "hf-cache" / "models--openai-community--gpt2" / "blobs" / blob_name(
        "model.safetensors", files["model.safetensors"])
    assert blob.read_bytes() == files["model.safetensors"]


@needs_hub
def test_a_partial_download_left_behind_never_loads(tmp_path, exported, fake_hub):
    """A `<blob>.incomplete` from a killed run: older huggingface_hub versions resume from it,
    newer ones start over; either way the model loaded is the right one."""
    _, files, logits = exported
    data = files["model.safetensors"]
    root = build_hf_cache(tmp_path / "hf-cache", {"config.json": files["config.json"]})
    partial = root / "blobs" / (blob_name("model.safetensors", data) + ".incomplete")
    partial.write_bytes(data[:5 << 20])
    got, err = load("gpt2", hub_env(tmp_path, fake_hub.endpoint), tmp_path)
    assert got is not None, err
    np.testing.assert_array_equal(got, logits)
    assert (root / "blobs" / blob_name("model.safetensors", data)).read_bytes() == data


@needs_hub
def test_size_check_failure_is_one_line_and_leaves_no_blob(tmp_path, fake_hub):
    fake_hub.size_lie["model.safetensors"] = 1000
    got, err = load("gpt2", hub_env(tmp_path, fake_hub.endpoint), tmp_path)
    msg = one_line_error(err)
    assert got is None and "downloading model.safetensors of openai-community/gpt2" in msg
    assert "Consistency check failed" in msg and "run again to retry" in msg
    blobs = tmp_path / "hf-cache" / "models--openai-community--gpt2" / "blobs"
    assert not [p for p in blobs.iterdir() if len(p.name) == 64]   # no model.safetensors blob


@needs_hub
def test_damaged_blob_names_the_file_to_delete(tmp_path, exported, fake_hub):
    _, files, logits = exported
    data = files["model.safetensors"]
    root = build_hf_cache(tmp_path / "hf-cache", files)
    blob = root / "blobs" / blob_name("model.safetensors", data)
    blob.write_bytes(data[: len(data) // 2])                       # truncated
    env = hub_env(tmp_path, fake_hub.endpoint)
    got, err = load("gpt2", {**env, "HF_HUB_OFFLINE": "1"}, tmp_path)
    msg = one_line_error(err)
    assert got is None and f"delete the file it points to, {blob}, and load again" in msg
    blob.unlink()                                                  # as the message says
    got, err = load("gpt2", env, tmp_path)
    assert got is not None, err
    np.testing.assert_array_equal(got, logits)
    assert blob.read_bytes() == data


@needs_hub
def test_mirror_without_the_repository(tmp_path, fake_hub):
    got, err = load("gpt2-large", hub_env(tmp_path, fake_hub.endpoint), tmp_path)
    msg = one_line_error(err)
    assert got is None
    assert f"openai-community/gpt2-large was not found at {fake_hub.endpoint} (HF_ENDPOINT) (HTTP 401)" in msg
    assert "unset HF_ENDPOINT" in msg


@needs_hub
def test_endpoint_that_is_not_a_hub(tmp_path, fake_hub):
    fake_hub.not_a_hub = True
    got, err = load("gpt2", hub_env(tmp_path, fake_hub.endpoint), tmp_path)
    msg = one_line_error(err)
    assert got is None and "could not download config.json of openai-community/gpt2" in msg
    assert "check the network connection (or HF_ENDPOINT)" in msg


# ---------------------------------------------------------------------------------------------
# Which way a name is fetched (in this process; huggingface_hub itself is not called)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def ways(monkeypatch, tmp_path, exported):
    """Record which of the two download paths each load takes (each returns the exported dir)."""
    calls = []

    def hub_download(name, progress=True):
        calls.append(("hub", name))
        return exported[0]

    def ensure_downloaded(name, cache_dir=None, progress=True):
        calls.append(("direct", name))
        return exported[0]

    monkeypatch.setattr(pretrained, "hub_download", hub_download)
    monkeypatch.setattr(pretrained, "ensure_downloaded", ensure_downloaded)
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "our-cache"))
    for var in ("GPT2_HUB", "GPT2_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return calls


@needs_hub
def test_which_way_a_name_is_fetched(ways, monkeypatch, tmp_path, exported):
    load_pretrained("gpt2")                                 # huggingface_hub is installed: through it
    load_pretrained("gpt2-medium", cache_dir=tmp_path / "c")  # --cache-dir: our cache, directly
    monkeypatch.setenv("GPT2_HUB", "0")
    load_pretrained("gpt2-large")
    monkeypatch.setenv("GPT2_HUB", "1")
    load_pretrained("gpt2-xl")
    load_pretrained(exported[0])                            # a directory is a directory
    assert ways == [("hub", "gpt2"), ("direct", "gpt2-medium"), ("direct", "gpt2-large"), ("hub", "gpt2-xl")]
    monkeypatch.setenv("GPT2_HUB", "sometimes")
    with pytest.raises(GPT2Error, match="GPT2_HUB must be 1 .* or auto"):
        load_pretrained("gpt2")


def test_without_huggingface_hub_the_direct_download_is_used(ways, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)   # import fails as if not installed
    load_pretrained("gpt2")
    assert ways == [("direct", "gpt2")]
    monkeypatch.setenv("GPT2_HUB", "1")
    with pytest.raises(GPT2Error, match=r"GPT2_HUB=1 but huggingface_hub is not installed: pip install "
                                        r"'minigrad-gpt2\[hub\]'"):
        load_pretrained("gpt2")


def test_a_model_in_our_cache_loads_without_any_download(ways, monkeypatch, tmp_path, exported):
    shutil.copytree(exported[0], tmp_path / "our-cache" / "gpt2")
    for setting in ("", "1", "0"):
        monkeypatch.setenv("GPT2_HUB", setting)
        model = load_pretrained("gpt2")
        with mg.no_grad():
            np.testing.assert_array_equal(model(IDS).data, exported[2])
    assert ways == []
