"""One corpus of legitimate blocks (tests/remote_corpus.py), run locally and remotely: equal saved values.

``remote=False`` is the oracle; ``remote="local"`` runs the whole remote path in-process
(encode, sandbox check, restricted execution, decode); the server tests send every block
to a real ``nnsight serve`` subprocess.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("RestrictedPython")
transformers = pytest.importorskip("transformers")

import remote_corpus  # noqa: E402
from nnsight import LanguageModel  # noqa: E402
from nnsight.tracing.cache import Cache  # noqa: E402

NAMES = sorted(remote_corpus.BLOCKS)


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-5)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=50257,
                                     attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    net = transformers.GPT2LMHeadModel(config).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(remote_corpus_fixtures()))
    return LanguageModel(net, tokenizer=tok)


def remote_corpus_fixtures():
    from pathlib import Path

    return Path(__file__).parent / "fixtures" / "gpt2-tokenizer"


def test_the_corpus_is_large_enough():
    assert len(NAMES) >= 50


@pytest.mark.parametrize("name", NAMES)
def test_block_runs_through_the_remote_path_with_local_results(model, name):
    block = remote_corpus.BLOCKS[name]
    local = block(model, False, torch)
    remote = block(model, "local", torch)
    assert same(local, remote), name


def test_a_saved_cache_comes_back_with_its_entries(model):
    with model.trace("Hello world", remote="local") as tracer:
        cache = tracer.cache()
    assert isinstance(cache, Cache)
    with model.trace("Hello world"):
        oracle = model.transformer.h[1].output.save()
    assert torch.allclose(cache["transformer.h.1"].output, oracle)
    assert torch.allclose(cache.model.transformer.h[1].output, oracle)
