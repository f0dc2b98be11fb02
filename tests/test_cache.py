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


def test_options_modules_dtype_device_inputs(gpt2, gpt2_tokenizer):
    from nnsight import LanguageModel

    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    seen = {}
    handle = gpt2.transformer.h[1].mlp.register_forward_hook(lambda m, a, o: seen.update(args=a, out=o.clone()))
    try:
        with torch.no_grad():
            gpt2(**gpt2_tokenizer("Hello world", return_tensors="pt"))
    finally:
        handle.remove()
    with model.trace("Hello world") as tracer:
        cache = tracer.cache(modules=["transformer.h.1.mlp", model.lm_head], dtype=torch.float16, device="cpu",
                             include_inputs=True, detach=False)
    assert sorted(cache) == ["model.lm_head", "model.transformer.h.1.mlp"]
    entry = cache["transformer.h.1.mlp"]
    assert entry.output.dtype == torch.float16 and torch.allclose(entry.output.float(), seen["out"], atol=1e-2)
    assert torch.allclose(entry.input.float(), seen["args"][0], atol=1e-2)
    assert entry.inputs[0][0] is entry.input and entry.inputs[1] == {}
    assert cache["lm_head"].output.requires_grad  # detach=False keeps the graph
    with model.trace("Hello world") as tracer:
        default = tracer.cache(modules=[model.lm_head])
    assert default["lm_head"].inputs is None and default["lm_head"].input is None  # include_inputs defaults to False
    with model.trace("Hello world") as tracer:
        no_out = tracer.cache(modules=[model.lm_head], include_output=False, include_inputs=True)
    assert no_out["lm_head"].output is None and no_out["lm_head"].input is not None
    with model.trace("Hello world") as tracer:
        synchronous = tracer.cache(modules=["transformer.h.1.mlp"], non_blocking=False)  # 0.8.1's copy flag
    assert torch.allclose(synchronous["transformer.h.1.mlp"].output, seen["out"], atol=1e-6)


def test_generation_steps_len_and_lists(gpt2, gpt2_tokenizer):
    from nnsight import LanguageModel

    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    with model.generate("Hello", max_new_tokens=3) as tracer:
        cache = tracer.cache(modules=[model.lm_head])
        logits = list().save()
        for step in tracer.iter[:]:
            logits.append(model.lm_head.output)
    view = cache.lm_head  # the short form
    assert len(view) == 3 and len(view.output) == 3 and len(view.calls) == 3
    for recorded, read in zip(view.output, logits):
        assert torch.equal(recorded, read)
    assert view.output[0].shape[1] == 1 and view.output[1].shape[1] == 1
    assert cache.model.transformer.h[0] is not None  # navigation to unrecorded modules works...
    with pytest.raises(KeyError, match="was not recorded"):
        cache.model.transformer.h[0].output  # ...and reading them names the module


def test_unknown_keys_are_named(gpt2):
    model = NNsight(gpt2)
    with model.trace(torch.tensor([[1, 2]])) as tracer:
        cache = tracer.cache(modules=[model.lm_head])
    with pytest.raises(KeyError, match="'transformer.nope' names no module"):
        cache["transformer.nope"]
    with pytest.raises(TypeError, match="must be a torch.dtype"):
        with model.trace(torch.tensor([[1, 2]])) as tracer:
            tracer.cache(dtype="half")
