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
    from nnsight.tracing.interleaver import ModuleHook

    yield
    assert ModuleHook.installed == 0, f"{ModuleHook.installed} nnsight hook(s) left on modules"


def _lora(base, folder, seed):
    """A random (non-identity) LoRA on GPT-2's attention and MLP projections, saved by peft."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False,
        lora_dropout=0.0,
    )
    peft.get_peft_model(base, config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def lora_dirs(tmp_path_factory):
    """Two different saved LoRA adapters for the tiny GPT-2 (``_gpt2()``)."""
    root = tmp_path_factory.mktemp("lora")
    return _lora(_gpt2(), root / "a", 1), _lora(_gpt2(), root / "b", 2)


@pytest.fixture
def fresh_gpt2():
    """A new tiny GPT-2 (same weights as ``gpt2_module``) for tests that change its modules."""
    return _gpt2()
