"""Scanning: shapes without computation or loaded weights."""

import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nnsight import LanguageModel, NNsight  # noqa: E402


def test_scan_gives_shapes(gpt2, gpt2_tokenizer):
    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    with model.scan("Hello world"):
        dim = model.transformer.h[0].output[0].shape[-1]
        shape = model.lm_head.output.shape
    assert dim == 32 and tuple(shape) == (1, 2, 50257)


def test_scan_without_loading_weights(tmp_path, gpt2, gpt2_tokenizer):
    gpt2.save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    model = LanguageModel(str(tmp_path))
    with model.scan("Hello"):
        dim = model.transformer.h[0].output[0].shape[-1]
    assert dim == 32
    assert next(model._module.parameters()).is_meta  # still not loaded


def test_scan_shape_mismatch_is_a_clear_error(seq):
    model = NNsight(seq)
    with pytest.raises(ValueError, match=r"model\[0\]\.output.*\(1, 3\).*\(1, 10\)"):
        with model.scan(torch.rand(1, 5)):
            model[0].output = torch.zeros(1, 3)


def test_scan_70b_config_on_meta_is_fast(gpt2_tokenizer):
    config = transformers.LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256,
    )
    start = time.perf_counter()
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    with model.scan("The Eiffel Tower"):
        shape = model.model.layers[-1].output.shape
    assert tuple(shape)[-1] == 8192
    assert time.perf_counter() - start < 60
