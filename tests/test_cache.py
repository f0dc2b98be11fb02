"""tracer.cache(): recorded values equal forward hooks; paths are unambiguous."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nnsight import LanguageModel, NNsight  # noqa: E402


def test_cache_matches_hooks_and_both_access_forms(gpt2, gpt2_tokenizer):
    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    seen = {}
    handle = gpt2.transformer.h[0].register_forward_hook(lambda m, i, o: seen.update(h0=o[0].detach()))
    gpt2(**gpt2_tokenizer("Hello", return_tensors="pt"))
    handle.remove()
    with model.trace("Hello") as tracer:
        cache = tracer.cache()
    assert torch.equal(cache["model.transformer.h.0"].output[0], seen["h0"])
    assert torch.equal(cache.model.transformer.h[0].output[0], seen["h0"])
    assert torch.equal(cache["transformer.h.0"].output[0], seen["h0"])
    assert "model.lm_head" in cache and len(list(cache)) == len(cache)
    assert not cache["model.lm_head"].output.requires_grad


def test_cache_llama_child_named_model(gpt2_tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LanguageModel(transformers.LlamaForCausalLM(config).eval(), tokenizer=gpt2_tokenizer)
    with model.trace("Hello") as tracer:
        cache = tracer.cache(modules=[model.model.layers[0]], include_inputs=True)
        direct = model.model.layers[0].output.save()
    assert torch.equal(cache.model.model.layers[0].output, direct)
    assert list(cache) == ["model.model.layers.0"]
    assert cache["model.model.layers.0"].inputs[0][0].shape[-1] == 32


def test_cache_keeps_every_call(twolayer):
    model = NNsight(twolayer)
    with model.trace(torch.rand(1, 4)) as tracer:
        cache = tracer.cache()
    assert len(cache["model.shared"].outputs) == 2
    assert len(cache["model.inp"].calls) == 1
