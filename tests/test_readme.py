"""Every example of the public nnsight README (except Remote, vLLM and .source), as written.

The README uses spellings 0.8.1 deprecates (`with tracer.iter[...]:`, `model.generator.output`);
the tests running them also check that the deprecation warning is given, as 0.8.1 gives it.

Module names are GPT-2's, as in the README, on a small GPT-2 with random weights
(6 layers so that ``h[5]`` exists); examples about real text run on SmolLM2 in
test_smollm2.py. Each test asserts what the README says the example shows.

The README is written for transformers 4.x, where a GPT-2 block returns a tuple and
``h[i].output[0]`` is the hidden states. Under 5.x the block returns the tensor, so the
same code means batch row 0 (nnsight 0.8.1 behaves the same). The oracle is the same
expression applied to what a plain ``register_forward_hook`` sees, so each test checks
the meaning the code has under the installed version. Two examples cannot run under 5.x
as written, and their tests check the error 0.8.1 also gives there: ``output[0][:, -1, :]``
on a 2-D row (IndexError), and ``.grad`` of the row view, which the loss never reaches.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nnsight import LanguageModel, NNsight, NNsightDeprecationWarning, OutOfOrderError  # noqa: E402


def _plain(model, prompt, names, zero_block0=False):
    """The raw outputs of the modules at ``names`` in a plain forward (hooks), and the logits."""
    seen = {}
    net = model._module
    handles = []
    if zero_block0:
        def zero(mod, args, out):
            out[0][:] = 0  # the README's edit, applied to the raw output
        handles.append(net.get_submodule("transformer.h.0").register_forward_hook(zero))
    for name in names:
        handles.append(net.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: seen.setdefault(name, o)))
    try:
        with torch.no_grad():
            logits = net(**model.tokenizer(prompt, return_tensors="pt")).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


@pytest.fixture(scope="module")
def model(gpt2_tokenizer):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=6, n_embd=48, n_head=4, n_positions=128)
    return LanguageModel(transformers.GPT2LMHeadModel(config).eval(), tokenizer=gpt2_tokenizer)


def test_quick_start_in_execution_order(model, transformers_major):
    with model.trace("The Eiffel Tower is in the city of"):
        model.transformer.h[0].output[0][:] = 0
        hidden_states = model.transformer.h[-1].output[0].save()
        output = model.output.save()
    text = model.tokenizer.decode(output.logits.argmax(dim=-1)[0])
    seen, logits = _plain(model, "The Eiffel Tower is in the city of", ["transformer.h.5"], zero_block0=True)
    assert torch.allclose(hidden_states, seen["transformer.h.5"][0], atol=1e-5)
    assert torch.allclose(output.logits, logits, atol=1e-4)
    assert text == model.tokenizer.decode(logits.argmax(dim=-1)[0])
    assert hidden_states.shape == ((1, 10, 48) if transformers_major < 5 else (10, 48))


def test_quick_start_as_written_reports_the_order(model):
    # The README reads h[-1] before writing h[0]; one forward cannot go back to h[0].
    with pytest.raises(OutOfOrderError, match=r"h\[0\].*already run"):
        with model.trace("The Eiffel Tower is in the city of"):
            hidden_states = model.transformer.h[-1].output[0].save()
            model.transformer.h[0].output[0][:] = 0
            output = model.output.save()


def test_accessing_activations(model, transformers_major):
    with model.trace("The Eiffel Tower is in the city of"):
        attn_output = model.transformer.h[0].attn.output[0].save()
        mlp_output = model.transformer.h[0].mlp.output.save()
        layer_output = model.transformer.h[5].output[0].save()
        logits = model.lm_head.output.save()
    names = ["transformer.h.0.attn", "transformer.h.0.mlp", "transformer.h.5", "lm_head"]
    seen, _ = _plain(model, "The Eiffel Tower is in the city of", names)
    assert torch.allclose(attn_output, seen["transformer.h.0.attn"][0], atol=1e-5)
    assert torch.allclose(mlp_output, seen["transformer.h.0.mlp"], atol=1e-5)
    assert torch.allclose(layer_output, seen["transformer.h.5"][0], atol=1e-5)
    assert torch.allclose(logits, seen["lm_head"], atol=1e-4)
    assert attn_output.shape == mlp_output.shape == (1, 10, 48)  # the attention module returns a tuple in both
    assert layer_output.shape == ((1, 10, 48) if transformers_major < 5 else (10, 48))


def test_in_place_modification(model, transformers_major):
    if transformers_major < 5:
        with model.trace("Hello"):
            model.transformer.h[0].output[0][:] = 0
            model.transformer.h[0].output[0][:, -1, :] = 0
            after = model.transformer.h[0].output[0].save()
        assert after.shape == (1, 1, 48) and torch.all(after == 0)
        return
    # 5.x: `output[0]` is row 0 (2-D), so zeroing it zeroes this one-row batch...
    with model.trace("Hello"):
        model.transformer.h[0].output[0][:] = 0
        after = model.transformer.h[0].output.save()
    assert after.shape == (1, 1, 48) and torch.all(after == 0)
    # ...and the last-token line has one index too many for it.
    with pytest.raises(IndexError, match="too many indices"):
        with model.trace("Hello"):
            model.transformer.h[0].output[0][:, -1, :] = 0


def test_replacement(model):
    with model.trace("Hello"):
        hs = model.transformer.h[-1].mlp.output.clone()
        noise = 0.01 * torch.randn(hs.shape)
        model.transformer.h[-1].mlp.output = hs + noise
        result = model.transformer.h[-1].mlp.output.save()
        original = hs.save()
    assert not torch.equal(result, original) and torch.allclose(result, original, atol=0.1)


def test_batching_with_invokers(model):
    with model.trace() as tracer:
        with tracer.invoke("The Eiffel Tower is in"):
            embeddings = model.transformer.wte.output
            output1 = model.lm_head.output.save()
        with tracer.invoke("_ _ _ _ _ _"):
            model.transformer.wte.output = embeddings
            output2 = model.lm_head.output.save()
    # Oracle: the first prompt's tokens under the second row's padding (6 tokens, left-padded to 7).
    ids = torch.tensor([model.tokenizer("The Eiffel Tower is in").input_ids])
    mask = torch.tensor([[0] + [1] * 6])
    expected = model._module(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    assert torch.allclose(output2[:, -1], expected.logits[:, -1], atol=1e-4)
    assert not torch.allclose(output1[:, -1], output2[:, -1], atol=1e-4)


def test_prompt_less_invokers(model):
    with model.trace() as tracer:
        with tracer.invoke("Hello"):
            out1 = model.lm_head.output[:, -1].save()
        with tracer.invoke(["World", "Test"]):
            out2 = model.lm_head.output[:, -1].save()
        with tracer.invoke():
            out_all = model.lm_head.output[:, -1].save()
    assert out_all.shape == (3, 50257) and out1.shape == (1, 50257) and out2.shape == (2, 50257)


def test_multi_token_generation(model):
    with pytest.warns(NNsightDeprecationWarning, match="generator.output"):  # as in 0.8.1: write tracer.result
        with model.generate("The Eiffel Tower is in", max_new_tokens=3) as tracer:
            output = model.generator.output.save()
    text = model.tokenizer.decode(output[0])
    assert text.startswith("The Eiffel Tower is in") and output.shape == (1, 7 + 3)


def test_iterating_over_generation_steps(model, transformers_major):
    with pytest.warns(NNsightDeprecationWarning) as record:  # both spellings are deprecated, as in 0.8.1
        with model.generate("Hello", max_new_tokens=5) as tracer:
            logits = list().save()
            with tracer.iter[:]:
                logits.append(model.lm_head.output[0][-1].argmax(dim=-1))
            output = model.generator.output.save()
    assert len([w for w in record if w.category is NNsightDeprecationWarning]) == 2
    text = model.tokenizer.batch_decode(logits)
    # Greedy generation: each step's argmax is the token generated at that step.
    assert torch.equal(torch.stack(logits), output[0, -5:])
    # transformers 5's batch_decode reads a flat list of ids as one sequence.
    tokens = output[0, -5:].tolist()
    if transformers_major < 5:
        assert text == [model.tokenizer.decode(t) for t in tokens]
    else:
        assert text == [model.tokenizer.decode(tokens)]


def test_conditional_interventions_per_step(model):
    with pytest.warns(NNsightDeprecationWarning, match="for step in tracer.iter"):
        with model.generate("Hello", max_new_tokens=5) as tracer:
            outputs = list().save()
            with tracer.iter[:] as step_idx:
                if step_idx == 2:
                    model.transformer.h[0].output[0][:] = 0
                outputs.append(model.transformer.h[-1].output[0])
    assert len(outputs) == 5


def test_gradients(model, transformers_major):
    def run():
        with model.trace("Hello"):
            hs = model.transformer.h[-1].output[0]
            hs.requires_grad_(True)
            logits = model.lm_head.output
            loss = logits.sum()
            with loss.backward():
                grad = hs.grad.save()
        return grad

    if transformers_major >= 5:
        # `output[0]` is a view of row 0 that the model never uses, so no gradient reaches it.
        with pytest.raises(OutOfOrderError, match="gradient"):
            run()
        return
    grad = run()
    # Oracle: autograd on a plain forward, through the last block's hidden states.
    seen = {}
    handle = model._module.transformer.h[-1].register_forward_hook(lambda m, a, o: seen.setdefault("hs", o[0]))
    try:
        logits = model._module(**model.tokenizer("Hello", return_tensors="pt")).logits
        (expected,) = torch.autograd.grad(logits.sum(), seen["hs"])
    finally:
        handle.remove()
    assert grad.shape == (1, 1, 48) and torch.allclose(grad, expected, atol=1e-5)


def test_model_editing(model):
    with model.edit() as model_edited:
        model.transformer.h[0].output[0][:] = 0
    with model.trace("Hello"):
        out1 = model.transformer.h[0].output[0].save()
    with model_edited.trace("Hello"):
        out2 = model_edited.transformer.h[0].output[0].save()
    assert not torch.all(out1 == 0)
    assert torch.all(out2 == 0)


def test_scanning_gpt2_small_without_weights(gpt2_tokenizer):
    with torch.device("meta"):
        small = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    model = LanguageModel(small, tokenizer=gpt2_tokenizer)
    with model.scan("Hello"):
        dim = model.transformer.h[0].output[0].shape[-1]
    assert dim == 768


def test_caching_activations(model, transformers_major):
    with model.trace("Hello") as tracer:
        cache = tracer.cache()
    layer0_out = cache["model.transformer.h.0"].output
    seen, _ = _plain(model, "Hello", ["transformer.h.0"])
    assert cache.model.transformer.h[0].output[0].shape == ((1, 1, 48) if transformers_major < 5 else (1, 48))
    assert torch.allclose(cache.model.transformer.h[0].output[0], seen["transformer.h.0"][0], atol=1e-5)
    assert torch.equal(layer0_out[0], cache.model.transformer.h[0].output[0])


def test_sessions(model):
    with model.session() as session:
        with model.trace("Hello"):
            hs1 = model.transformer.h[0].output[0].save()
        with model.trace("World"):
            model.transformer.h[0].output[0][:] = hs1
            hs2 = model.transformer.h[0].output[0].save()
    assert torch.equal(hs1, hs2)


def test_nnsight_for_any_pytorch_model():
    net = torch.nn.Sequential(torch.nn.Linear(5, 10), torch.nn.Linear(10, 2))
    model = NNsight(net)
    x = torch.rand(1, 5)
    with model.trace(x):
        layer1_out = model[0].output.save()
        output = model.output.save()
    assert torch.equal(layer1_out, net[0](x)) and torch.equal(output, net(x))


def test_ad_hoc_module_application(model, transformers_major):
    with model.trace("The Eiffel Tower is in the city of"):
        hidden_states = model.transformer.h[-1].output[0]
        logits = model.lm_head(model.transformer.ln_f(hidden_states))
        tokens = logits.argmax(dim=-1).save()
        final = model.lm_head.output.argmax(dim=-1).save()
    # The last block feeds ln_f and lm_head, so the lens over it is the model's own prediction
    # (under 5.x for row 0 only: `[0]` took the row).
    assert torch.equal(tokens, final if transformers_major < 5 else final[0])


def test_core_concepts_example(model, transformers_major):
    with model.trace("Hello"):
        hs = model.transformer.h[-1].output[0]
        hs = hs.save()
    seen, _ = _plain(model, "Hello", ["transformer.h.5"])
    assert torch.allclose(hs, seen["transformer.h.5"][0], atol=1e-5)
    assert hs.shape == ((1, 1, 48) if transformers_major < 5 else (1, 48))


def test_module_hierarchy_print(model):
    text = repr(model)
    assert text.startswith("GPT2LMHeadModel(") and "(h): ModuleList" in text and "(lm_head): Linear" in text
