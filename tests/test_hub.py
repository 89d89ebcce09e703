"""llama2nb.hub: `llama2nb download NAME` through the real huggingface_hub client against a local
stand-in of the hub (an HTTP server on 127.0.0.1 answering /{repo}/resolve/main/{file} as the
hub does), then `resolve_model` and `llama2nb sample NAME` from the cache with no endpoint."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from llama2nb import hub
from llama2nb.files.llama2c import write_checkpoint
from llama2nb.testmodels import random_weights
from llama2nb.cli import main
from llama2nb.config import ModelConfig
from tests.conftest import LLAMA2_BIN, LLAMA2_MODEL, STORIES260K, requires

REPO = Path(__file__).resolve().parent.parent
CLI = "from llama2nb.cli import main; main(prog_name='llama2nb')"  # the `llama2nb` console script
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(http.server.ThreadingHTTPServer):
    """Serves {"repo/path/in/repo": bytes} at /repo/resolve/<rev>/path (and /datasets/...)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def _lookup(self):
        path = self.path.split("?")[0].lstrip("/").removeprefix("datasets/")
        parts = path.split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return None
        return self.server.files.get("/".join(parts[:2] + parts[4:]))

    def _headers(self, data: bytes | None) -> None:
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()

    def do_HEAD(self):
        self.server.requests.append("HEAD " + self.path)
        self._headers(self._lookup())

    def do_GET(self):
        self.server.requests.append("GET " + self.path)
        data = self._lookup()
        self._headers(data)
        if data is not None:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(tmp_path):
    files = {}
    cfg = ModelConfig(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, seq_len=512)
    small = tmp_path / "small.bin"
    write_checkpoint(small, cfg, random_weights(cfg))
    files["karpathy/tinyllamas/stories260K/stories260K.bin"] = (
        STORIES260K.read_bytes() if STORIES260K.exists() else small.read_bytes())
    from llama2nb.tokenizer import write_bin
    from llama2nb.testmodels import byte_vocab

    pieces, scores = byte_vocab()
    pieces = (pieces + [b"x%d" % i for i in range(512)])[:512]
    scores = (scores + [0.0] * 512)[:512]
    write_bin(tmp_path / "tok512.bin", pieces, scores)
    files["karpathy/tinyllamas/stories260K/tok512.bin"] = (tmp_path / "tok512.bin").read_bytes()
    server = FakeHub(files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def env_for(tmp_path: Path, endpoint: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hf-cache"), LLAMA2NB_CACHE=str(tmp_path / "l2nb-cache"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(REPO))
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    else:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_download_then_sample_by_name(fake_hub, tmp_path):
    assert hub.resolve_model("stories260K", cache_dir=tmp_path / "hf-cache") is None  # nothing cached yet
    proc = cli(["download", "stories260K"], env_for(tmp_path, fake_hub.endpoint))
    assert proc.returncode == 0, proc.stderr
    assert "sample with: llama2nb sample stories260K" in proc.stdout
    assert any("stories260K/stories260K.bin" in r for r in fake_hub.requests)
    found = hub.resolve_model("stories260K", cache_dir=tmp_path / "hf-cache")
    assert found is not None
    ckpt, tok = found
    assert ckpt.read_bytes() == fake_hub.files["karpathy/tinyllamas/stories260K/stories260K.bin"]
    assert tok.name == "tok512.bin" and "models--karpathy--tinyllamas" in str(ckpt)
    assert hub.resolve_model("STORIES260K.bin", cache_dir=tmp_path / "hf-cache") == found
    # offline (no endpoint, HF_HUB_OFFLINE): the sample command finds the model by name
    n_before = len(fake_hub.requests)
    proc = cli(["sample", "stories260K", "-n", "16", "-t", "0"], env_for(tmp_path, None))
    assert proc.returncode == 0, proc.stderr
    assert len(fake_hub.requests) == n_before


def test_download_a_gguf_by_repo_and_file_name(fake_hub, tmp_path):
    """`download REPO FILE`: any model file of a repository, through the hub cache, checked."""
    from llama2nb.files.gguf import write_gguf
    from llama2nb.tokenizer import Tokenizer

    cfg = ModelConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=512, seq_len=32)
    write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg), Tokenizer.load(tmp_path / "tok512.bin"), "f32", "m")
    fake_hub.files["someone/tiny-GGUF/tiny.f32.gguf"] = (tmp_path / "m.gguf").read_bytes()
    proc = cli(["download", "someone/tiny-GGUF", "tiny.f32.gguf"], env_for(tmp_path, fake_hub.endpoint))
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.split("model: ")[1].split(" (")[0])
    assert path.read_bytes() == fake_hub.files["someone/tiny-GGUF/tiny.f32.gguf"] and "dim 32" in proc.stdout
    n_before = len(fake_hub.requests)  # offline: the cached copy, no request
    offline = cli(["download", "someone/tiny-GGUF", "tiny.f32.gguf"], env_for(tmp_path, None))
    assert offline.returncode == 0 and len(fake_hub.requests) == n_before, offline.stderr
    sampled = cli(["sample", str(path), "-n", "4", "-t", "0"], env_for(tmp_path, None))
    assert sampled.returncode == 0, sampled.stderr  # its own vocabulary
    bad = cli(["download", "not a repo", "x.gguf"], env_for(tmp_path, fake_hub.endpoint))
    assert bad.returncode == 1 and "repository: expected an id like owner/name" in bad.stderr


def test_download_unknown_and_failing(tmp_path, fake_hub):
    r = CliRunner().invoke(main, ["download", "stories7B"])
    assert r.exit_code == 1 and "expected one of stories260K, stories15M, stories42M, stories110M" in r.output
    # stories15M's checkpoint is not on the stand-in: a one-line error, no traceback
    proc = cli(["download", "stories15M"], env_for(tmp_path, fake_hub.endpoint))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "karpathy/tinyllamas/stories15M.bin: download failed" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@requires(LLAMA2_MODEL)
def test_llama2_tokenizer_converted_from_the_hub_model(tmp_path, fake_hub, monkeypatch):
    """stories15M's tokenizer: the Llama 2 tokenizer.model from the hub, converted once into
    llama2nb's cache; the result is llama2.c's tokenizer.bin byte for byte."""
    fake_hub.files["karpathy/tinyllamas/stories15M.bin"] = fake_hub.files["karpathy/tinyllamas/stories260K/stories260K.bin"]
    fake_hub.files["NousResearch/Llama-2-7b-hf/tokenizer.model"] = LLAMA2_MODEL.read_bytes()
    proc = cli(["download", "stories15M"], env_for(tmp_path, fake_hub.endpoint))
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr.lower()
    monkeypatch.setenv("LLAMA2NB_CACHE", str(tmp_path / "l2nb-cache"))
    ckpt, tok = hub.resolve_model("stories15M", cache_dir=tmp_path / "hf-cache")
    assert tok == tmp_path / "l2nb-cache" / "tokenizers" / "llama2-tokenizer.bin"
    assert tok.read_bytes() == LLAMA2_BIN.read_bytes()
    assert hashlib.sha256(tok.read_bytes()).hexdigest() == hub.LLAMA2_TOKENIZER_BIN_SHA256
    # the converted file is rebuilt from the cached .model, offline, if it goes missing
    tok.unlink()
    assert hub.resolve_model("stories15M", cache_dir=tmp_path / "hf-cache")[1].read_bytes() == LLAMA2_BIN.read_bytes()


def test_download_model_with_patched_client(tmp_path, monkeypatch):
    """download_model goes through huggingface_hub.hf_hub_download with each file's repo."""
    import huggingface_hub

    seen = []

    def fake(repo_id, filename, repo_type=None, cache_dir=None, **kw):
        seen.append((repo_id, filename))
        path = tmp_path / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url, timeout: seen.append(("HEAD", url)))
    ckpt, tok = hub.download_model("stories260K")
    assert [s for s in seen if s[0] != "HEAD"] == [("karpathy/tinyllamas", "stories260K/stories260K.bin"),
                                                   ("karpathy/tinyllamas", "stories260K/tok512.bin")]
    assert [url.rsplit("/", 1)[1] for kind, url in seen if kind == "HEAD"] == ["stories260K.bin", "tok512.bin"]
    assert ckpt == tmp_path / "stories260K/stories260K.bin" and tok == tmp_path / "stories260K/tok512.bin"


def test_hub_and_cli_import_without_torch():
    code = ("import sys, llama2nb.hub, llama2nb.cli, llama2nb.training.commands, llama2nb.training.data, "
            "llama2nb.training.vocab, llama2nb.training.evaluate; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_known_models():
    assert set(hub.KNOWN_MODELS) == {"stories260K", "stories15M", "stories42M", "stories110M"}
    assert hub.KNOWN_MODELS["stories110M"].checkpoint.filename == "stories110M.bin"
    assert hub.resolve_model("not-a-model") is None


class SilentHub:
    """A stand-in for an unreachable hub: accepts connections on 127.0.0.1, reads each request
    line and never answers. Records the request lines and whether the client hung up."""

    def __init__(self):
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.requests: list[str] = []
        self.hung_up: list[bool] = []
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn):
        with conn:
            data = b""
            while b"\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            self.requests.append(data.split(b"\r\n")[0].decode())
            while conn.recv(4096):  # read until the client gives up and closes
                pass
            self.hung_up.append(True)

    def close(self):
        self.sock.close()
        for thread in self.threads:
            thread.join(timeout=10)


@pytest.mark.parametrize("args,path", [
    (["download", "stories15M"], "/karpathy/tinyllamas/resolve/main/stories15M.bin"),
    (["download", "someone/tiny-GGUF", "tiny.Q4_0.gguf"], "/someone/tiny-GGUF/resolve/main/tiny.Q4_0.gguf"),
    (["data", "download", "--data-dir", "DATA"], "/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"),
])
def test_unreachable_hub_is_one_line_after_the_configured_attempts(tmp_path, args, path):
    """A hub that accepts connections and never answers: the configured number of requests,
    each abandoned by the client (its timeout, HF_HUB_ETAG_TIMEOUT here, fired), then one line."""
    silent = SilentHub()
    env = dict(env_for(tmp_path, silent.endpoint), HF_HUB_ETAG_TIMEOUT="1")
    try:
        proc = cli([a.replace("DATA", str(tmp_path / "data")) for a in args], env)
    finally:
        silent.close()
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "expected an answer from the Hugging Face hub, found none" in proc.stderr
    assert f"in {hub.HUB_ATTEMPTS} attempts with a 1 s timeout each" in proc.stderr
    assert silent.requests == [f"HEAD {path} HTTP/1.1"] * hub.HUB_ATTEMPTS
    assert silent.hung_up == [True] * hub.HUB_ATTEMPTS
    assert not (tmp_path / "data").exists()


def test_reachability_check_uses_the_configured_timeout_and_attempts(tmp_path, monkeypatch, caplog):
    """In process: every request gets hub_timeout(), HUB_ATTEMPTS requests HUB_RETRY_WAIT apart,
    huggingface_hub's own warnings are silenced meanwhile, and the real download never starts;
    a copy already in the cache is returned instead of the error."""
    import logging

    import huggingface_hub

    calls, waits = [], []

    def no_answer(url, timeout):
        calls.append(timeout)
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise TimeoutError("timed out")

    def never(*args, **kwargs):
        raise AssertionError("hf_hub_download called although the hub did not answer")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_answer)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", never)
    monkeypatch.setattr(hub.time, "sleep", waits.append)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_ETAG_TIMEOUT", huggingface_hub.constants.DEFAULT_ETAG_TIMEOUT)
    with caplog.at_level(logging.WARNING), pytest.raises(hub.HubError, match="found none in 2 attempts with a 5 s"):
        hub.download_model("stories260K", cache_dir=tmp_path / "empty")
    assert hub.hub_timeout() == hub.HUB_TIMEOUT == 5.0 and hub.HUB_ATTEMPTS == 2
    assert calls == [hub.HUB_TIMEOUT] * hub.HUB_ATTEMPTS
    assert waits == [hub.HUB_RETRY_WAIT] * (hub.HUB_ATTEMPTS - 1)
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_ETAG_TIMEOUT", 2)  # as HF_HUB_ETAG_TIMEOUT=2 sets it
    assert hub.hub_timeout() == 2.0
    # a copy in the cache is used when the hub does not answer
    monkeypatch.setattr(hub, "_cached", lambda spec, cache_dir: f"/cache/{spec.filename}")
    ckpt, tok = hub.download_model("stories260K", cache_dir=tmp_path / "empty")
    assert (ckpt, tok) == (Path("/cache/stories260K/stories260K.bin"), Path("/cache/stories260K/tok512.bin"))


def test_offline_mode_uses_only_the_cache(tmp_path):
    """HF_HUB_OFFLINE: no request at all, and a file missing from the cache is one line."""
    silent = SilentHub()
    env = dict(env_for(tmp_path, None), HF_ENDPOINT=silent.endpoint)
    try:
        proc = cli(["download", "stories260K"], env)
    finally:
        silent.close()
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "expected it in the hub cache (HF_HUB_OFFLINE is set), found nothing" in proc.stderr
    assert silent.requests == []


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at its top or inside functions, as absolute names."""
    import ast

    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names.update([module] + [f"{module}.{a.name}" for a in node.names])
    return names


def test_arrows_point_down():
    """The hub and the tokenizer sit below the training package; `python -m llama2nb.training`
    builds its own command group instead of importing the CLI above it."""
    for low in ("hub.py", "tokenizer.py"):
        assert not [m for m in imported_modules(REPO / "llama2nb" / low) if m.startswith("llama2nb.training")], low
    assert not [m for m in imported_modules(REPO / "llama2nb" / "training" / "__main__.py") if m.startswith("llama2nb.cli")]
    assert "llama2nb.training.commands" in imported_modules(REPO / "llama2nb" / "training" / "__main__.py")
