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
from remote_support import connect, remote_config, serve_tiny  # noqa: E402,F401


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve_tiny(tmp_path_factory, "corpus")


@pytest.fixture
def models(served, remote_config):
    return (*connect(served, remote_config), served[0])


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
