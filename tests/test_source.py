"""Operation-level access through .source, against hooks on the same operations."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nnsight import LanguageModel  # noqa: E402


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_listing_names_call_sites(gpt2, gpt2_tokenizer):
    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    text = str(model.transformer.h[0].attn.source)
    assert "attention_interface_0 ->" in text and "self_c_proj_0 ->" in text
    with pytest.raises(AttributeError, match="self_c_proj_0"):
        model.transformer.h[0].attn.source.no_such_op_0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rewritten_forward_is_identical_without_interventions(family, gpt2, gpt2_tokenizer):
    hf = gpt2 if family == "gpt2" else _llama()
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    envoys = model.transformer.h if family == "gpt2" else model.model.layers
    text = "The Eiffel Tower is in the city of"
    with model.trace(text):
        for layer in envoys:
            attn = layer.attn if family == "gpt2" else layer.self_attn
            ops = list(attn.source._info.operations)
            getattr(attn.source, ops[-1]).output  # makes the attention run its rewritten forward
            mlp_ops = list(layer.mlp.source._info.operations)
            getattr(layer.mlp.source, mlp_ops[-1]).output
        logits = model.output.logits.save()
    plain = hf(**gpt2_tokenizer(text, return_tensors="pt")).logits
    assert torch.equal(logits, plain)
    assert all("forward" not in m.__dict__ for m in hf.modules())


def test_operation_values_equal_hooks_on_the_same_modules(gpt2, gpt2_tokenizer):
    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    seen = {}
    handle = gpt2.transformer.h[0].attn.c_proj.register_forward_hook(lambda m, i, o: seen.update(out=o, inp=i[0]))
    gpt2(**gpt2_tokenizer("Hello world", return_tensors="pt"))
    handle.remove()
    with model.trace("Hello world"):
        op = model.transformer.h[0].attn.source.self_c_proj_0
        op_in = op.input.save()
        op_out = op.output.save()
    assert torch.allclose(op_out, seen["out"]) and torch.allclose(op_in, seen["inp"])


def test_operation_write_equals_hand_patched(gpt2, gpt2_tokenizer):
    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    enc = gpt2_tokenizer("Hello world", return_tensors="pt")
    with model.trace("Hello world"):
        model.transformer.h[0].attn.source.self_c_proj_0.output[:] = 0
        logits = model.output.logits.save()
    handle = gpt2.transformer.h[0].attn.c_proj.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    expected = gpt2(**enc).logits
    handle.remove()
    assert torch.allclose(logits, expected, atol=1e-6)


def test_attention_interface_output_as_in_the_readme(gpt2, gpt2_tokenizer):
    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    with model.trace("Hello"):
        attn_out = model.transformer.h[0].attn.source.attention_interface_0.output.save()
    assert isinstance(attn_out, tuple) and attn_out[0].shape[-1] == 8


def _eager_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64)
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config).eval()


def test_source_recurses_into_the_called_function(gpt2_tokenizer):
    model = LanguageModel(_eager_gpt2(), tokenizer=gpt2_tokenizer)
    with model.trace("Hello world there"):
        op = model.transformer.h[0].attn.source.attention_interface_0
        probs = op.source.nn_functional_softmax_0.output.save()  # inside eager_attention_forward
        weights = op.output[1].save()  # the same probabilities, as the function returns them
    assert torch.allclose(probs, weights)
    with model.trace("Hello world there"):
        op = model.transformer.h[0].attn.source.attention_interface_0
        op.source.nn_functional_softmax_0.output[:] = 0
        attn = op.output[0].save()
    assert torch.all(attn == 0)


def test_unknown_operation_of_the_called_function(gpt2_tokenizer):
    model = LanguageModel(_eager_gpt2(), tokenizer=gpt2_tokenizer)
    with pytest.raises(AttributeError, match="torch_matmul_0"):
        with model.trace("Hello"):
            model.transformer.h[0].attn.source.attention_interface_0.source.no_such_0.output


def test_source_under_an_accelerate_dispatched_model(gpt2, gpt2_tokenizer):
    """accelerate's device hooks (what ``device_map=...`` installs) wrap an instance's forward;
    .source runs the named operations inside that wrapper, and leaves it in place."""
    import copy

    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    hf = copy.deepcopy(gpt2)
    mlp = hf.transformer.h[0].mlp
    add_hook_to_module(mlp, AlignDevicesHook(execution_device="cpu"))
    wrapper = mlp.__dict__["forward"]
    calls = []
    original_pre = mlp._hf_hook.pre_forward

    def counting_pre(module, *args, **kwargs):
        calls.append(1)
        return original_pre(module, *args, **kwargs)

    mlp._hf_hook.pre_forward = counting_pre
    seen = []
    handle = mlp.act.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    model = LanguageModel(hf, tokenizer=gpt2_tokenizer)
    try:
        with model.trace("The Eiffel Tower is in"):
            gelu = model.transformer.h[0].mlp.source.self_act_0.output.clone().save()
            model.transformer.h[0].mlp.source.self_act_0.output[:] = 0
            mlp_out = model.transformer.h[0].mlp.output.save()
    finally:
        handle.remove()
    assert calls == [1]  # accelerate's pre-forward ran around the rewritten forward
    assert torch.allclose(gelu, seen[0])
    assert torch.allclose(mlp_out, mlp.c_proj(torch.zeros_like(seen[0])))
    assert mlp.__dict__["forward"] is wrapper  # the wrapper is back in place


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 8)
        self.fc2 = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_operation_skip_equals_hand_patched_forward():
    """``model.source.self_fc1_0.skip(v)``: the forward as if ``self.fc1(x)`` had returned ``v``."""
    from nnsight import NNsight

    torch.manual_seed(0)
    net, x, v = _MLP(), torch.rand(2, 8), torch.full((2, 8), 2.0)
    model = NNsight(net)
    with model.trace(x):
        model.source.self_fc1_0.skip(v)
        out = model.output.save()
    assert torch.equal(out, net.fc2(torch.relu(v)))
    with model.trace(x):
        again = model.output.save()
    assert torch.equal(again, net(x))  # the skip was for that trace only
