"""The public client's conveniences against a real `nnsight serve`: status, version checks on every
request, NDIF_* environment variables, zstd-compressed results with a progress bar, gradients."""

from __future__ import annotations

import io

import pytest
import torch

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("RestrictedPython")
pytest.importorskip("transformers")

import nnsight  # noqa: E402
from nnsight import LanguageModel  # noqa: E402
from nnsight.remote import compression  # noqa: E402
from nnsight.remote.schema import PROTOCOL_VERSION  # noqa: E402
from nnsight.remote.wire import VersionMismatch  # noqa: E402
from remote_support import connect, remote_config, serve_tiny  # noqa: E402,F401


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve_tiny(tmp_path_factory, "client")


@pytest.fixture
def models(served, remote_config):
    return (*connect(served, remote_config), served[0], served[1])


def test_status_and_is_model_running(models):
    _, _, srv, _ = models
    status = nnsight.status()
    assert status["tiny-gpt2"]["state"] == "ready"
    assert status["tiny-gpt2"]["kind"] == requests.get(srv.url + "/v1/models/tiny-gpt2").json()["kind"]
    assert "tiny-gpt2" in str(status)
    assert nnsight.is_model_running("tiny-gpt2") is True
    assert nnsight.is_model_running("no-such-model") is False
    assert nnsight.ndif.status is nnsight.status


def test_compare_reads_the_servers_environment(models):
    """The served process runs this venv, so nothing differs; versions are the installed ones."""
    import sys

    import torch

    _, _, srv, _ = models
    comparison = nnsight.compare()
    assert comparison.python_matches and comparison.remote_python == sys.version.split()[0]
    assert comparison.packages["torch"] == {"local": torch.__version__, "remote": torch.__version__, "match": True,
                                            "critical": True}
    assert comparison.critical_mismatches == {}
    assert "torch" in str(comparison)
    assert requests.get(srv.url + "/v1/env").status_code == 401  # behind the API key like every /v1 route


def test_env_comparison_flags_what_differs():
    from nnsight.ndif import EnvComparison

    local = {"python_version": "3.11.7 (main)", "packages": {"torch": "2.13.0", "tqdm": "4.0", "mine": "local"}}
    remote = {"python_version": "3.12.1 (main)", "packages": {"torch": "2.12.0", "tqdm": "4.0", "extra": "1.0"}}
    comparison = EnvComparison(local, remote)
    assert not comparison.python_matches
    assert set(comparison.mismatches) == {"torch", "extra"} and set(comparison.critical_mismatches) == {"torch"}
    assert "mine" not in comparison.packages  # the user's own modules travel by value
    assert "differs (critical)" in str(comparison) and "2 mismatches, 1 critical" in repr(comparison)


def test_status_of_an_unreachable_server_is_empty(remote_config, capsys):
    remote_config.API.HOST = "http://127.0.0.1:9"
    assert nnsight.is_model_running("tiny-gpt2") is False
    assert "not reachable" in capsys.readouterr().err


def test_ndif_status_is_the_deprecated_name_of_status(remote_config, capsys):
    remote_config.API.HOST = "http://127.0.0.1:9"
    with pytest.warns(nnsight.NNsightDeprecationWarning, match=r"^nnsight\.ndif_status\(\) is deprecated.*nnsight\.status\(\)"):
        old = nnsight.ndif_status()
    new = nnsight.status()
    assert type(old) is type(new) and dict(old) == dict(new) == {} and old.reachable is new.reachable is False
    with pytest.warns(nnsight.NNsightDeprecationWarning):
        assert nnsight.ndif_status(raw=True) == nnsight.status(raw=True) == {}
    assert "ndif_status" not in nnsight.__all__  # a deprecated name is not star-exported


def test_ndif_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("NNSIGHT_CONFIG_DIR", str(tmp_path))
    for name in ("NNSIGHT_HOST", "NNSIGHT_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NDIF_HOST", "http://ndif.example:1")
    monkeypatch.setenv("NDIF_API_KEY", "ndif-key")
    from nnsight.config import Config

    config = Config()
    assert (config.API.HOST, config.API.APIKEY) == ("http://ndif.example:1", "ndif-key")
    monkeypatch.setenv("NNSIGHT_API_KEY", "ours")  # ours win when both are set
    assert Config().API.APIKEY == "ours"


def test_the_server_refuses_another_protocol_naming_both_versions(models):
    _, _, srv, key = models
    for path in ("/v1/models", "/health", "/v1/jobs/abc"):
        r = requests.get(srv.url + path, headers={"X-API-Key": key, "X-NNsight-Protocol": "999", "X-NNsight-Version": "9.9"})
        assert r.status_code == 426, path
        message = r.json()["error"]["message"]
        assert f"protocol {PROTOCOL_VERSION}" in message and "protocol 999" in message and "9.9" in message
        assert "upgrade the server" in message
    ok = requests.get(srv.url + "/health")
    assert ok.headers["X-NNsight-Protocol"] == str(PROTOCOL_VERSION)


def test_the_client_refuses_a_server_of_another_protocol(models, monkeypatch):
    remote, _, _, _ = models
    from nnsight.remote import versions

    real = versions._current
    monkeypatch.setattr(versions, "_current", lambda: (PROTOCOL_VERSION + 1, "9.9.9"))
    with pytest.raises(VersionMismatch, match=rf"protocol {PROTOCOL_VERSION + 1} .* protocol {PROTOCOL_VERSION}"):
        nnsight.status()
    monkeypatch.setattr(versions, "_current", real)
    assert nnsight.is_model_running("tiny-gpt2")


def test_large_results_are_compressed_and_equal(models, capsys):
    remote, local, srv, key = models
    for model, flag in ((remote, True), (local, False)):
        with model.trace("Hello world " * 20, remote=flag) as tracer:
            logits = model.lm_head.output.save()
        if flag:
            job = tracer.job
            remote_logits = logits
    assert remote_logits.numel() * 4 > compression.PROGRESS_BYTES
    assert torch.allclose(remote_logits, logits, atol=1e-5)
    raw = requests.get(f"{srv.url}/v1/jobs/{job.id}/result", headers={"X-API-Key": key, "Accept-Encoding": "zstd"}, stream=True)
    assert raw.headers["Content-Encoding"] == "zstd"
    assert int(raw.headers["Content-Length"]) < int(raw.headers["X-Uncompressed-Length"])
    plain = requests.get(f"{srv.url}/v1/jobs/{job.id}/result", headers={"X-API-Key": key, "Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
    assert b"".join(compression.chunks(raw, "t", show_progress=False)) == plain.content


class _FakeResponse:
    def __init__(self, body, headers):
        self.raw = io.BytesIO(body)
        self.headers = headers
        read = self.raw.read
        self.raw.read = lambda n, decode_content=False: read(n)


def test_download_decompresses_in_chunks_with_a_progress_bar(capsys):
    payload = b'{"values": {}, "pad": "' + b"x" * (3 << 20) + b'"}'
    body, headers = compression.compress_body(payload, "zstd")
    assert headers["Content-Encoding"] == "zstd" and len(body) < len(payload) // 10
    headers["Content-Length"] = str(len(body))
    assert b"".join(compression.chunks(_FakeResponse(body, headers), "t")) == payload
    small, none = compression.compress_body(b"{}", "zstd")
    assert (small, none) == (b"{}", {})
    assert compression.compress_body(payload, "gzip")[1] == {}
    big = b"y" * (2 << 20)
    b"".join(compression.chunks(_FakeResponse(big, {"Content-Length": str(len(big))}), "job x"))
    assert "downloading job x" in capsys.readouterr().err


def test_gradients_remotely_without_requires_grad(models):
    remote, local, _, _ = models
    grads = {}
    for model, flag in ((remote, True), (local, False)):
        with model.trace("Hello", remote=flag):
            emb = model.transformer.wte.output
            loss = model.lm_head.output[0, -1].logsumexp(-1)
            with loss.backward():
                g = emb.grad.save()
        grads[flag] = g
    assert grads[True].abs().sum() > 0
    assert torch.allclose(grads[True], grads[False], atol=1e-5)


def test_a_server_reported_error_is_raised_without_falling_back_to_polling(models, monkeypatch):
    remote, _, _, _ = models
    from nnsight.remote.client import RemoteJob

    def no_poll(self, deadline):
        raise AssertionError("the client polled after the server had reported the error")

    monkeypatch.setattr(RemoteJob, "_poll", no_poll)
    with pytest.raises(ValueError, match="invalid literal"):
        with remote.trace("Hello", remote=True):
            n = int("not a number")
            out = remote.lm_head.output.save()
