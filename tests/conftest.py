"""Shared tiny models. Random weights, built from configs: nothing is downloaded."""

import os
import pathlib

import pytest
import torch

torch.set_num_threads(1)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


class TwoLayer(torch.nn.Module):
    """A module that calls ``shared`` twice per forward, for multi-call tests."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(4, 8)
        self.shared = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 2)
        self.unused = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.inp(x)
        h = self.shared(h)
        h = torch.relu(self.shared(h))
        return self.out(h)


@pytest.fixture
def seq():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))


@pytest.fixture
def twolayer():
    torch.manual_seed(0)
    return TwoLayer()


def _gpt2(n_layer=2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=4, vocab_size=50257, n_positions=64, attn_pdrop=0.0,
        embd_pdrop=0.0, resid_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config)
    model.eval()
    return model


@pytest.fixture(scope="session")
def gpt2_module():
    return _gpt2()


@pytest.fixture
def gpt2(gpt2_module):
    return gpt2_module


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    transformers = pytest.importorskip("transformers")
    folder = FIXTURES / "gpt2-tokenizer"
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(folder))
    return tok


@pytest.fixture(autouse=True)
def _no_leaked_hooks():
    """Every test must leave no nnsight hook on any module."""
    yield
    left = leaked_slots()
    assert not left, f"{len(left)} nnsight hook(s) left on modules"


def leaked_slots():
    """Every nnsight slot still sitting in some module's forward (found through the garbage collector)."""
    import gc

    from nnsight.tracing.interleaver import ModuleSlot

    return [o for o in gc.get_objects() if type(o) is ModuleSlot and o.users]
