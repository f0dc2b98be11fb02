"""Shared helpers for the remote tests: a tiny GPT-2 folder and a real `nnsight serve` subprocess.

(A support module: it defines no tests itself.)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
NNSIGHT = [sys.executable, "-m", "nnsight.server.cli"]


def make_tiny_gpt2(folder: Path, n_layer=2) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=32, n_head=4, n_positions=64, vocab_size=50257,
                                     attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in os.listdir(FIXTURES / "gpt2-tokenizer"):
        shutil.copy(FIXTURES / "gpt2-tokenizer" / name, folder / name)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(data_dir: Path) -> dict:
    env = dict(os.environ)
    env["NNSIGHT_SERVER_DIR"] = str(data_dir)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("NNSIGHT_API_KEY", None)
    return env


def create_key(data_dir: Path, name="test") -> str:
    out = subprocess.run(NNSIGHT + ["serve", "keys", "create", "--name", name, "--data-dir", str(data_dir)],
                         capture_output=True, text=True, check=True, env=env_for(data_dir))
    return out.stdout.strip()


class Server:
    def __init__(self, proc, url, data_dir, log):
        self.proc, self.url, self.data_dir, self.log = proc, url, data_dir, log

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_text(self):
        return Path(self.log).read_text(errors="replace")


def start_server(models, data_dir: Path, *extra, timeout=120) -> Server:
    import requests

    port = free_port()
    log = data_dir / "server.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            NNSIGHT + ["serve", *models, "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir), *extra],
            stdout=f, stderr=subprocess.STDOUT, env=env_for(data_dir),
        )
    url = f"http://127.0.0.1:{port}"
    server = Server(proc, url, data_dir, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + server.log_text())
        try:
            health = requests.get(url + "/health", timeout=2).json()
            if health["status"] == "ok":
                return server
        except Exception:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError("server did not become healthy:\n" + server.log_text())


def serve_tiny(tmp_path_factory, label):
    """A module-scoped server of a tiny GPT-2 (``yield from`` it in a fixture): ``(server, key, folder)``."""
    root = tmp_path_factory.mktemp(label)
    folder = make_tiny_gpt2(root / "tiny")
    data = root / "data"
    key = create_key(data)
    srv = start_server([f"tiny-gpt2={folder}"], data, "--job-timeout", "30")
    try:
        yield srv, key, folder
    finally:
        srv.stop()


def connect(served, config):
    """Point ``config`` at ``served``; returns ``(remote model, local model of the same weights)``."""
    from nnsight import LanguageModel

    srv, key, folder = served
    config.API.HOST = srv.url
    config.API.APIKEY = key
    return LanguageModel("tiny-gpt2", remote=True), LanguageModel(str(folder))


@pytest.fixture
def remote_config(monkeypatch, tmp_path):
    """Point nnsight.CONFIG at a test config dir; returns the CONFIG object."""
    monkeypatch.setenv("NNSIGHT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("NNSIGHT_HOST", raising=False)
    monkeypatch.delenv("NNSIGHT_API_KEY", raising=False)
    monkeypatch.delenv("NDIF_HOST", raising=False)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    from nnsight import CONFIG

    CONFIG.load()
    CONFIG.APP.REMOTE_LOGGING = False
    yield CONFIG
    CONFIG.load()
