"""``envoys=`` chooses the class of each envoy; ``eproperty`` adds hookable values to such a class.

Oracles: plain forward hooks and hand-patched forwards on the same module.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nnsight import Envoy, LanguageModel, NNsight, NotInTraceError  # noqa: E402
from nnsight.intervention.envoy import eproperty  # noqa: E402
from nnsight.intervention.hooks import requires_output  # noqa: E402

N_HEADS = 4


class Marked(Envoy):
    pass


class Other(Envoy):
    pass


class Heads(Envoy):
    """``.heads``: the attention output per head, a view, so in-place edits reach the model."""

    @eproperty(key="output")
    def heads(self, value):
        hs = value[0]
        b, s, h = hs.shape
        return hs.view(b, s, N_HEADS, h // N_HEADS).transpose(1, 2)


class CopiedHeads(Envoy):
    """The same values as a copy, written back by a transform."""

    @eproperty(key="output")
    def heads(self, value):
        hs = value[0]
        b, s, h = hs.shape
        return hs.view(b, s, N_HEADS, h // N_HEADS).transpose(1, 2).clone()

    @heads.transform
    def heads(self, view, raw):
        b, nh, s, hd = view.shape
        return (view.transpose(1, 2).reshape(b, s, nh * hd), *raw[1:])


class Doubled(Envoy):
    """Older style: a stub marked with requires_output, plus a postprocess for assignments."""

    @eproperty(key="output")
    @requires_output
    def raw_out(self):
        ...

    @eproperty(key="output")
    def doubled(self, value):
        return value * 2

    @doubled.postprocess
    def doubled(self, value):
        return value / 2


def _attn_type(gpt2):
    return type(gpt2.transformer.h[0].attn)


def test_one_class_for_every_envoy(gpt2):
    model = NNsight(gpt2, envoys=Marked)
    assert type(model.transformer.h[0].attn.c_proj) is Marked and type(model.lm_head) is Marked


def test_dict_by_class_through_the_mro_and_by_name(gpt2):
    model = NNsight(gpt2, envoys={torch.nn.Module: Other, "mlp": Marked})  # class keys win over names
    assert type(model.transformer.h[0].mlp) is Other
    model = NNsight(gpt2, envoys={_attn_type(gpt2): Marked, "mlp": Other, "h.*": Heads})
    assert type(model.transformer.h[0].attn) is Marked
    assert type(model.transformer.h[1].mlp) is Other
    assert type(model.transformer.h[1]) is Heads
    assert type(model.transformer.h[0].attn.c_attn) is Envoy  # unmatched: the base class
    assert type(model.transformer.h) is Envoy and type(model.transformer.ln_f) is Envoy


def test_names_match_whole_components_and_aliases(gpt2):
    model = NNsight(gpt2, envoys={"ml": Marked, "lp": Marked, "ffn": Other}, rename={"mlp": "ffn"})
    assert type(model.transformer.h[0].mlp) is Other  # via its alias, never via a substring
    assert type(model.transformer.h[0].mlp.c_fc) is Envoy


def test_class_attribute_default_and_keyword_override(gpt2):
    class Wrapped(NNsight):
        envoys = {"mlp": Marked}

    assert type(Wrapped(gpt2).transformer.h[0].mlp) is Marked
    assert type(Wrapped(gpt2, envoys=None).transformer.h[0].mlp) is Envoy
    assert type(Wrapped(gpt2, envoys=Other).transformer.h[0].mlp) is Other


@pytest.mark.parametrize("envoys, message", [
    (dict, "must be an Envoy subclass"),
    ({"mlp": dict}, r"envoys\['mlp'\] must be an Envoy subclass"),
    ({3: Marked}, "keys are module classes or path names"),
    ([Marked], "must be an Envoy subclass or a dict"),
])
def test_bad_envoys_are_named(gpt2, envoys, message):
    with pytest.raises(TypeError, match=message):
        NNsight(gpt2, envoys=envoys)


def _plain_attn(gpt2, ids, edit=None):
    seen = {}

    def hook(module, args, out):
        if edit is not None:
            out = edit(out)
        seen["attn"] = out[0].clone()
        return out

    handle = gpt2.transformer.h[0].attn.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = gpt2(ids).logits
    finally:
        handle.remove()
    return seen["attn"], logits


def _zero_head(out, head=1):
    hs = out[0].clone()
    b, s, h = hs.shape
    hs.view(b, s, N_HEADS, h // N_HEADS)[:, :, head] = 0
    return (hs, *out[1:])


@pytest.mark.parametrize("cls", [Heads, CopiedHeads])
def test_eproperty_reads_wait_and_edits_reach_the_model(gpt2, cls):
    ids = torch.tensor([[464, 412, 733, 417]])
    model = NNsight(gpt2, envoys={_attn_type(gpt2): cls})
    plain, _ = _plain_attn(gpt2, ids)
    with model.trace(ids):
        heads = model.transformer.h[0].attn.heads.clone().save()
    assert heads.shape == (1, N_HEADS, 4, 8)
    assert torch.allclose(heads.transpose(1, 2).reshape(1, 4, 32), plain, atol=1e-6)
    expected_attn, expected_logits = _plain_attn(gpt2, ids, edit=_zero_head)
    with model.trace(ids):
        model.transformer.h[0].attn.heads[:, 1] = 0
        again = model.transformer.h[0].attn.heads.save()  # read again before the write-back: same edit
        attn = model.transformer.h[0].attn.output[0].save()
        logits = model.output.logits.save()
    assert torch.all(again[:, 1] == 0)
    assert torch.allclose(attn, expected_attn, atol=1e-6)
    assert torch.allclose(logits, expected_logits, atol=1e-5)


def test_eproperty_stub_and_postprocess(seq):
    model = NNsight(seq, envoys={torch.nn.Linear: Doubled})
    x = torch.rand(2, 5)
    with model.trace(x):
        raw = model[0].raw_out.save()
        doubled = model[0].doubled.save()
        model[2].doubled = torch.ones(2, 2)  # postprocess: the model gets ones / 2
        out = model.output.save()
    assert torch.allclose(raw, seq[0](x)) and torch.allclose(doubled, 2 * seq[0](x))
    assert torch.allclose(out, torch.full((2, 2), 0.5))


def test_eproperty_outside_a_trace_and_bad_keys(seq):
    model = NNsight(seq, envoys=Doubled)
    with pytest.raises(NotInTraceError, match=r"model\[0\]\.doubled was accessed outside of a trace"):
        model[0].doubled
    with pytest.raises(ValueError, match="key 'weights' names no value of a module"):
        class Bad(Envoy):
            @eproperty(key="weights")
            def w(self, value):
                return value


def test_language_model_takes_envoys_and_rename(gpt2, gpt2_tokenizer):
    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer, envoys={_attn_type(gpt2): Heads}, rename={"transformer.h": "layers"})
    with model.trace("Hello world"):
        heads = model.layers[0].attn.heads.save()
    assert heads.shape[1] == N_HEADS
