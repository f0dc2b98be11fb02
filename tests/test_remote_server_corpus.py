"""Every block of the corpus (tests/remote_corpus.py) sent to a real `nnsight serve`: results equal local ones."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("RestrictedPython")
pytest.importorskip("transformers")

import remote_corpus  # noqa: E402
from nnsight import LanguageModel  # noqa: E402
from test_remote_corpus import same  # noqa: E402
from test_remote_support import create_key, make_tiny_gpt2, remote_config, start_server  # noqa: E402,F401


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    folder = make_tiny_gpt2(root / "tiny")
    data = root / "data"
    key = create_key(data)
    srv = start_server([f"tiny-gpt2={folder}"], data, "--job-timeout", "30")
    try:
        yield srv, key, folder
    finally:
        srv.stop()


@pytest.fixture
def models(served, remote_config):
    srv, key, folder = served
    remote_config.API.HOST = srv.url
    remote_config.API.APIKEY = key
    return LanguageModel("tiny-gpt2", remote=True), LanguageModel(str(folder)), srv


@pytest.mark.parametrize("name", sorted(remote_corpus.BLOCKS))
def test_block_runs_on_the_server_with_local_results(models, name):
    remote, local, _ = models
    block = remote_corpus.BLOCKS[name]
    assert same(block(local, False, torch), block(remote, True, torch)), name


def test_a_user_error_fifty_times_in_one_worker_comes_back_and_the_worker_survives(models):
    remote, local, srv = models
    import requests

    for _ in range(50):
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            with remote.trace("Hello", remote=True):
                bad = torch.ones(2, 3) @ torch.ones(2, 3)
                out = remote.lm_head.output.save()
    with remote.trace("Hello", remote=True):
        out = remote.lm_head.output.save()
    with local.trace("Hello"):
        oracle = local.lm_head.output.save()
    assert torch.allclose(out, oracle, atol=1e-5)
    assert "Segmentation fault" not in srv.log_text()
    assert "restarted the worker" not in srv.log_text()
    assert requests.get(srv.url + "/health", timeout=5).json()["models"]["tiny-gpt2"] == "ready"
