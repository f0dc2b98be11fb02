"""``rename=``: aliases for module paths, in envoys, print(model), get(), caches; the real path keeps working."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nnsight import LanguageModel, NNsight  # noqa: E402

RENAME = {"transformer.h": "layers", "mlp": "ffn", "transformer": "model"}


@pytest.fixture
def model(gpt2, gpt2_tokenizer):
    return LanguageModel(gpt2, tokenizer=gpt2_tokenizer, rename=RENAME)


def test_alias_and_real_path_are_the_same_envoy(model):
    assert model.layers[0].ffn is model.transformer.h[0].mlp
    assert model.model.h[1] is model.transformer.h[1]
    assert model.get("layers.0.ffn") is model.transformer.h[0].mlp
    assert model.get("model.layers.1.ffn") is model.transformer.h[1].mlp
    assert model.layers[0].ffn.path == "model.transformer.h.0.mlp"  # paths stay real
    assert len(model.layers) == 2 and "ffn" in dir(model.layers[0])


def test_values_through_an_alias_equal_a_plain_hook(model, gpt2, gpt2_tokenizer):
    seen = {}
    handle = gpt2.transformer.h[0].mlp.register_forward_hook(lambda m, a, o: seen.setdefault("mlp", o.clone()))
    try:
        with torch.no_grad():
            gpt2(**gpt2_tokenizer("Hello world", return_tensors="pt"))
    finally:
        handle.remove()
    with model.trace("Hello world"):
        via_alias = model.layers[0].ffn.output.save()
        model.layers[0].ffn.output = torch.zeros_like(model.layers[0].ffn.output)
        after = model.transformer.h[0].mlp.output.save()
    assert torch.allclose(via_alias, seen["mlp"], atol=1e-6)
    assert torch.all(after == 0)


def test_print_labels_aliases_like_0_8_1(model):
    text = repr(model)
    assert "(model/transformer): GPT2Model(" in text
    assert "(ffn/mlp): GPT2MLP(" in text
    assert "\n  (layers): ModuleList(\n    (0-1): 2 x GPT2Block(" in text  # an alias reaching further down is listed last
    assert repr(LanguageModel(model._module, tokenizer=model.tokenizer)) == repr(model._module)


def test_cache_keys_accept_aliases(model):
    with model.trace("Hello") as tracer:
        cache = tracer.cache()
    real = cache["model.transformer.h.0.mlp"].output
    assert torch.equal(cache["model.layers.0.ffn"].output, real)
    assert torch.equal(cache["layers.0.ffn"].output, real)
    assert torch.equal(cache.model.layers[0].ffn.output, real)
    assert torch.equal(cache.model.model.h[0].mlp.output, real)


def test_wildcards_class_keys_and_dotted_aliases(gpt2):
    attn = type(gpt2.transformer.h[0].attn)
    model = NNsight(gpt2, rename={"*.h": "blocks", attn: "attention", "attn.c_proj": "attn.o_proj"})
    assert model.blocks is model.transformer.h
    assert model.transformer.h[0].attention is model.transformer.h[0].attn
    assert model.transformer.h[0].attn.o_proj is model.transformer.h[0].attn.c_proj


def test_keys_that_resolve_nowhere_are_skipped(gpt2):
    model = NNsight(gpt2, rename={"model.layers": "layers", "transformer.h": "layers"})
    assert model.layers is model.transformer.h


@pytest.mark.parametrize("rename, message", [
    ({"transformer.wte": "lm_head"}, "already a child module"),
    ({"transformer.h": "output"}, "envoy attribute"),
    ({"lm_head": "config"}, "would hide the attribute"),
    ({"transformer.wte": "emb", "transformer.wpe": "emb"}, "would name both"),
    ({"h.*": "block"}, "matches 2 modules"),
])
def test_an_alias_that_would_hide_something_is_an_error(gpt2, rename, message):
    with pytest.raises(ValueError, match=message):
        NNsight(gpt2, rename=rename)


def test_a_bad_rename_is_named(gpt2):
    with pytest.raises(TypeError, match="rename must be a dict"):
        NNsight(gpt2, rename=["h"])
