"""The vLLM backend against independent oracles, on SmolLM2-135M (fp32, CPU, in-process engine).

Oracles: plain ``register_forward_hook`` hooks on vLLM's own modules during a plain
``LLM.generate`` (rows per request cut with vLLM's own ``query_start_loc`` and request
order), plain greedy ``generate`` tokens, and the Hugging Face model of the same weights.
"""

import subprocess
import sys
import warnings
from contextlib import contextmanager

import pytest
import torch

import os

from vllm_support import vllm_installed  # noqa: E402

if not vllm_installed() and not os.environ.get("NNSIGHT_REQUIRE_VLLM"):
    # Not installed here (the main suite's venv): `bash scripts/test_vllm.sh` runs these tests.
    pytest.skip("vLLM is not installed here; run `bash scripts/test_vllm.sh`", allow_module_level=True)

# Installed (or required, as scripts/test_vllm.sh requires it): a broken import is an error, not a skip.
import vllm  # noqa: F401, E402
from vllm import SamplingParams  # noqa: E402
from vllm.forward_context import get_forward_context  # noqa: E402

from nnsight import MissedValueError, NNsightError  # noqa: E402
from nnsight.modeling.vllm import VLLM  # noqa: E402

PROMPTS = ["The Eiffel Tower is in the city of", "Hello", "One, two, three, four,"]
MAX_TOKENS = [3, 2, 4]


# -- oracles -------------------------------------------------------------------------


def _runner(model):
    worker = model.llm.llm_engine.model_executor.driver_worker
    return getattr(worker, "worker", worker).model_runner


def _prompt_index(req_id):
    # LLM.generate names requests "<counter>-<random suffix>", the counter in prompt order.
    return int(req_id.rsplit("-", 1)[0])


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    return tuple(_clone(v) for v in value)


def _rows(value, start, end):
    if isinstance(value, torch.Tensor):
        return value[start:end]
    return tuple(v[start:end] for v in value)


@contextmanager
def hooked(model, module, per_request=False, edit=None, pre=False):
    """Record ``module``'s value per request and call during plain vLLM runs; ``edit`` may change it.

    Yields ``calls``: {prompt index: [value of each call]} (prompt index in submission order).
    ``edit(prompt, call, rows_view)`` edits a request's rows in place.
    """
    runner = _runner(model)
    seen = {}
    calls = {}

    def layout(n_rows):
        ids = list(runner.input_batch.req_ids)[: n_rows if per_request else None]
        if per_request:
            starts = list(range(len(ids) + 1))
        else:
            metadata = next(iter(get_forward_context().attn_metadata.values()))
            starts = metadata.query_start_loc.tolist()
            ids = ids[: len(starts) - 1]
        base = min(_prompt_index(i) for i in ids) if not seen else seen["base"]
        seen.setdefault("base", base)
        return [(_prompt_index(i) - seen["base"], starts[k], starts[k + 1]) for k, i in enumerate(ids)]

    def on_value(value):
        first = value if isinstance(value, torch.Tensor) else value[0]
        for prompt, start, end in layout(first.shape[0]):
            call = len(calls.setdefault(prompt, []))
            if edit is not None:
                edit(prompt, call, _rows(value, start, end))
            calls[prompt].append(_clone(_rows(value, start, end)))

    if pre:
        handle = module.register_forward_pre_hook(lambda m, args: on_value(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: on_value(out))
    try:
        yield calls
    finally:
        handle.remove()


def plain_generate(model, prompts, max_tokens):
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in max_tokens]
    outputs = model.llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


def _three_invokes(model, body_modules):
    """A trace with one invoke per prompt saving, per step, the values of ``body_modules(model)``."""
    with model.trace(temperature=0.0) as tracer:
        with tracer.invoke(PROMPTS[0], max_tokens=MAX_TOKENS[0]):
            a = list().save()
            for _ in tracer.iter[:]:
                a.append([_clone(m.output) for m in body_modules(model)])
        with tracer.invoke(PROMPTS[1], max_tokens=MAX_TOKENS[1]):
            b = list().save()
            for _ in tracer.iter[:]:
                b.append([_clone(m.output) for m in body_modules(model)])
        with tracer.invoke(PROMPTS[2], max_tokens=MAX_TOKENS[2]):
            c = list().save()
            for _ in tracer.iter[:]:
                c.append([_clone(m.output) for m in body_modules(model)])
    return [a, b, c]


# -- the README example ----------------------------------------------------------------


def test_readme_example_per_step_logits(model):
    with model.trace("Hello", temperature=0.0, max_tokens=5) as tracer:
        logits = list().save()
        for _ in tracer.iter[:]:
            logits.append(model.logits.output)
    assert len(logits) == 5 and all(t.shape == (1, model.llm.llm_engine.model_config.get_vocab_size()) for t in logits)
    assert [int(t.argmax(-1)) for t in logits] == plain_generate(model, ["Hello"], [5])[0]


def test_readme_section_examples(model):
    with model.trace(temperature=0.0) as tracer:
        with tracer.invoke("The Eiffel Tower is in the city of", max_tokens=3):
            hidden = list().save()
            for _ in tracer.iter[:]:
                hidden.append(model.model.layers[5].mlp.output)
        with tracer.invoke("Hello", max_tokens=5, temperature=0.8, seed=1):
            for _ in tracer.iter[2]:
                model.model.layers[5].mlp.output[:] = 0
        with tracer.invoke():
            sizes = list().save()
            for _ in tracer.iter[:]:
                sizes.append(model.logits.output.shape[0])
        with tracer.invoke("Bonjour", max_tokens=2):
            outputs = tracer.result.save()
    assert [tuple(h.shape) for h in hidden] == [(9, 576), (1, 576), (1, 576)]
    assert sizes == [3, 3, 2, 1, 1]
    assert [len(o.outputs[0].token_ids) for o in outputs] == [3, 5, 2]

    token = model.tokenizer(" London")["input_ids"][0]
    with model.trace(PROMPTS[0], temperature=0.0, max_tokens=1):
        model.logits.output[:, token] = 1e9
        forced = model.samples.output.save()
    assert int(forced) == token

    with model.trace(PROMPTS[0], temperature=0.0, max_tokens=1):
        out = model.model.layers[3].output
        stream = (out[0] + out[1]).save()
        model.model.layers[3].output = (stream * 2, torch.zeros_like(stream))
        after = model.model.layers[4].inputs[0][1].save()  # layer 4 sees mlp_out + residual as its input pair
        residual_in = model.model.layers[4].inputs[0][2].save()
    assert torch.equal(after, stream * 2) and not residual_in.any()

    with pytest.raises(MissedValueError, match="lm_head"):
        with model.trace(PROMPTS[0], max_tokens=1):
            model.lm_head.output.save()


def test_envoy_tree_mirrors_vllm_modules(model):
    assert model.model.layers[5].mlp._module is _runner(model).model.model.layers[5].mlp
    assert len(model.model.layers) == 30
    assert "model.logits" in repr(model) and "LlamaDecoderLayer" in repr(model)


# -- saved values == a plain forward hook, per request ------------------------------------


def test_saved_values_equal_forward_hook_rows(model):
    inner = _runner(model).model

    def modules(m):
        return [m.model.layers[3].mlp, m.model.layers[5], m.logits]

    with hooked(model, inner.model.layers[3].mlp) as mlp, hooked(model, inner.model.layers[5]) as layer, hooked(
        model, inner.logits_processor, per_request=True
    ) as logits:
        expected_tokens = plain_generate(model, PROMPTS, MAX_TOKENS)
    saved = _three_invokes(model, modules)
    for prompt, steps in enumerate(saved):
        assert len(steps) == MAX_TOKENS[prompt]  # each invoke's loop runs for its own request only
        for step, (mlp_out, layer_out, step_logits) in enumerate(steps):
            assert _equal(mlp_out, mlp[prompt][step])
            assert _equal(layer_out, layer[prompt][step])
            assert _equal(step_logits, logits[prompt][step])
            assert int(step_logits.argmax(-1)) == expected_tokens[prompt][step]
        # step 0 holds every prompt token, later steps one token
        assert [s[0].shape[0] for s in steps][1:] == [1] * (len(steps) - 1)
        assert steps[0][0].shape[0] == len(model.tokenizer(PROMPTS[prompt])["input_ids"])


def test_inputs_equal_forward_pre_hook(model):
    inner = _runner(model).model
    with hooked(model, inner.model.layers[4].mlp, pre=True) as seen:
        plain_generate(model, PROMPTS[:2], [2, 2])
    with model.trace(temperature=0.0, max_tokens=2) as tracer:
        with tracer.invoke(PROMPTS[0]):
            a = list().save()
            for _ in tracer.iter[:]:
                a.append(model.model.layers[4].mlp.input.clone())
        with tracer.invoke(PROMPTS[1]):
            b = list().save()
            for _ in tracer.iter[:]:
                b.append(model.model.layers[4].mlp.inputs[0][0].clone())
    for prompt, got in enumerate([a, b]):
        assert len(got) == 2 and all(torch.equal(g, e) for g, e in zip(got, seen[prompt]))


def test_invoke_without_prompt_sees_whole_batch(model):
    with model.trace(temperature=0.0, max_tokens=2) as tracer:
        with tracer.invoke(PROMPTS[0]):
            mine = model.model.layers[0].mlp.output.shape[0]
            mine = [mine].save()
        with tracer.invoke(PROMPTS[1]):
            pass
        with tracer.invoke():
            total = list().save()
            for _ in tracer.iter[:]:
                total.append(model.model.layers[0].mlp.output.shape[0])
                total.append(model.logits.output.shape[0])
    n0 = len(model.tokenizer(PROMPTS[0])["input_ids"])
    n1 = len(model.tokenizer(PROMPTS[1])["input_ids"])
    assert mine == [n0]
    assert total == [n0 + n1, 2, 2, 2]


def test_one_invoke_with_several_prompts(model):
    with model.trace(PROMPTS[:2], temperature=0.0, max_tokens=2) as tracer:
        shapes = list().save()
        for _ in tracer.iter[:]:
            shapes.append((model.model.layers[0].output[0].shape[0], tuple(model.samples.output.shape)))
    n = sum(len(model.tokenizer(p)["input_ids"]) for p in PROMPTS[:2])
    assert shapes == [(n, (2, 1)), (2, (2, 1))]


def test_prompts_of_one_invoke_reordered_by_vllm(model):
    """A stop string ends prompt 0 first; vLLM then moves prompt 2 into its place, before prompt 1."""
    params = SamplingParams(temperature=0.0, max_tokens=4, stop=["\n"])
    expected = [list(o.outputs[0].token_ids) for o in model.llm.generate(PROMPTS, params, use_tqdm=False)]
    assert len(expected[0]) < 4 and len(expected[1]) == len(expected[2]) == 4  # the premise of this test
    with model.trace(PROMPTS, temperature=0.0, max_tokens=4, stop=["\n"]) as tracer:
        first = model.samples.output.save()  # step 0: rows in prompt order
        outputs = tracer.result.save()
    assert first.flatten().tolist() == [e[0] for e in expected]
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    with pytest.raises(NNsightError, match="reordered the prompts of this invoke"):
        with model.trace(PROMPTS, temperature=0.0, max_tokens=4, stop=["\n"]) as tracer:
            for _ in tracer.iter[:]:
                model.samples.output.save()
    assert not model.llm.llm_engine.has_unfinished_requests()


def test_session_of_two_traces(model):
    with model.session():
        with model.trace(PROMPTS[1], temperature=0.0, max_tokens=1):
            first = model.model.layers[2].mlp.output.save()
        with model.trace(PROMPTS[1], temperature=0.0, max_tokens=1):
            model.model.layers[2].mlp.output = first * 0
            zeroed = model.model.layers[2].mlp.output.save()
    assert first.abs().sum() > 0 and zeroed.abs().sum() == 0


def test_dispatch_false_builds_no_engine_until_used():
    lazy = VLLM("smollm2-135m", dispatch=False)
    assert lazy._llm is None and not lazy._dispatched


# -- greedy tokens == plain generate ----------------------------------------------------


def test_greedy_samples_equal_plain_generate(model):
    saved = _three_invokes(model, lambda m: [m.samples])
    tokens = [[int(s[0]) for s in steps] for steps in saved]
    assert tokens == plain_generate(model, PROMPTS, MAX_TOKENS)


def test_result_is_the_request_outputs(model):
    with model.trace(PROMPTS[0], temperature=0.0, max_tokens=4) as tracer:
        outputs = tracer.result.save()
    assert [list(o.outputs[0].token_ids) for o in outputs] == plain_generate(model, PROMPTS[:1], [4])
    assert outputs[0].outputs[0].text.startswith(" Paris.")


# -- interventions == a plain hook doing the same edit -------------------------------------


def test_intervention_equals_hook_edit(model):
    """Invoke 2 adds a vector to layer 6's MLP output at step 1 only; invokes 1 and 3 are untouched."""
    inner = _runner(model).model
    torch.manual_seed(0)
    steer = torch.randn(inner.config.hidden_size) * 4

    def edit(prompt, call, rows):
        if prompt == 1 and call == 1:
            rows += steer

    with hooked(model, inner.model.layers[6].mlp, edit=edit), hooked(
        model, inner.logits_processor, per_request=True
    ) as logits:
        expected = plain_generate(model, PROMPTS, [4, 4, 4])
    baseline = plain_generate(model, PROMPTS, [4, 4, 4])

    with model.trace(temperature=0.0, max_tokens=4) as tracer:
        with tracer.invoke(PROMPTS[0]):
            a = list().save()
            for _ in tracer.iter[:]:
                a.append(model.logits.output.clone())
        with tracer.invoke(PROMPTS[1]):
            b = list().save()
            for step in tracer.iter[:]:
                if step == 1:
                    model.model.layers[6].mlp.output += steer
                b.append(model.logits.output.clone())
            tokens_b = tracer.result
            tokens_b = [list(o.outputs[0].token_ids) for o in tokens_b].save()
        with tracer.invoke(PROMPTS[2]):
            c = list().save()
            for _ in tracer.iter[:]:
                c.append(model.logits.output.clone())
    for prompt, got in enumerate([a, b, c]):
        assert all(torch.equal(g, e) for g, e in zip(got, logits[prompt])), prompt
    assert tokens_b == expected
    assert expected[1] != baseline[1] and expected[0] == baseline[0]  # the edit mattered, and only there


def test_input_write_equals_pre_hook_edit(model):
    inner = _runner(model).model

    def edit(prompt, call, rows):
        if prompt == 0:
            rows *= 0.5

    with hooked(model, inner.model.layers[2].mlp, pre=True, edit=edit), hooked(
        model, inner.logits_processor, per_request=True
    ) as logits:
        plain_generate(model, PROMPTS[:2], [3, 3])
    with model.trace(temperature=0.0, max_tokens=3) as tracer:
        with tracer.invoke(PROMPTS[0]):
            a = list().save()
            for _ in tracer.iter[:]:
                model.model.layers[2].mlp.input = model.model.layers[2].mlp.input * 0.5
                a.append(model.logits.output.clone())
        with tracer.invoke(PROMPTS[1]):
            b = list().save()
            for _ in tracer.iter[:]:
                b.append(model.logits.output.clone())
    for prompt, got in enumerate([a, b]):
        assert len(got) == 3 and all(torch.equal(g, e) for g, e in zip(got, logits[prompt]))


def test_logits_write_forces_the_sampled_token(model):
    forced = model.tokenizer(" London")["input_ids"][0]
    with model.trace(PROMPTS[0], temperature=0.0, max_tokens=4) as tracer:
        tokens = list().save()
        for step in tracer.iter[:]:
            if step == 0:
                model.logits.output[:] = float("-inf")
                model.logits.output[:, forced] = 0.0
            tokens.append(int(model.samples.output[0, 0]))
    assert tokens[0] == forced
    prompt_ids = model.tokenizer(PROMPTS[0])["input_ids"]
    continued = plain_generate(model, [{"prompt_token_ids": prompt_ids + [forced]}], [3])[0]
    assert tokens[1:] == continued  # generation went on from the forced token


def test_samples_write_replaces_the_token(model):
    forced = model.tokenizer(" Rome")["input_ids"][0]
    with model.trace(PROMPTS[0], temperature=0.0, max_tokens=3) as tracer:
        for _ in tracer.iter[0]:
            model.samples.output = torch.tensor([[forced]])
        outputs = tracer.result.save()
    tokens = list(outputs[0].outputs[0].token_ids)
    prompt_ids = model.tokenizer(PROMPTS[0])["input_ids"]
    assert tokens[0] == forced
    assert tokens[1:] == plain_generate(model, [{"prompt_token_ids": prompt_ids + [forced]}], [2])[0]


# -- the Hugging Face model of the same weights -----------------------------------------------


def test_hidden_states_match_hugging_face(model, smollm2_path):
    from nnsight import LanguageModel

    hf = LanguageModel(smollm2_path, dispatch=True, dtype=torch.float32)
    ids = model.tokenizer(PROMPTS[0])["input_ids"]
    layers = [0, 5, 29]
    with hf.trace({"input_ids": [ids]}):
        hf_layers = [hf.model.layers[i].output for i in layers]
        hf_layers = [(o[0] if isinstance(o, tuple) else o)[0].save() for o in hf_layers]
        hf_logits = hf.lm_head.output[0, -1].save()
    with model.trace({"prompt_token_ids": ids}, temperature=0.0, max_tokens=1):
        outs = [model.model.layers[i].output for i in layers]
        residual = [(o[0] + o[1]).save() for o in outs]  # vLLM: (mlp_out, residual); the stream is their sum
        logits = model.logits.output[0].save()
    for got, want in zip(residual, hf_layers):
        assert got.shape == want.shape == (len(ids), hf.config.hidden_size)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits, hf_logits, atol=2e-3, rtol=1e-4)
    assert int(logits.argmax()) == int(hf_logits.argmax())


# -- limits and errors ---------------------------------------------------------------------


def test_gradients_are_refused_with_a_pointer_to_language_model(model):
    with pytest.raises(NNsightError, match="gradients.*LanguageModel"):
        with model.trace(PROMPTS[0], max_tokens=1):
            loss = model.logits.output.sum()
            with loss.backward():
                pass
    with pytest.raises(NNsightError, match="scan.*LanguageModel"):
        model.scan(PROMPTS[0])
    with pytest.raises(NNsightError, match="remote.*LanguageModel"):
        model.trace(PROMPTS[0], remote=True)
    with pytest.raises(NNsightError, match="edit.*LanguageModel"):
        model.edit()


def test_bad_configurations_fail_before_building_an_engine():
    with pytest.raises(NNsightError, match="tensor_parallel_size=1.*LanguageModel"):
        VLLM("unused", tensor_parallel_size=2)
    with pytest.raises(NNsightError, match="enforce_eager=True"):
        VLLM("unused", enforce_eager=False)
    with pytest.raises(NNsightError, match="enable_prefix_caching=False"):
        VLLM("unused", enable_prefix_caching=True)


def test_n_samples_and_unknown_options_are_refused(model):
    with pytest.raises(NNsightError, match="n=2"):
        with model.trace(PROMPTS[0], n=2, max_tokens=1):
            pass
    with pytest.raises(TypeError, match="SamplingParams"):
        with model.trace(PROMPTS[0], max_new_tokens=1):
            pass


def test_step_after_a_request_finished(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with model.trace(PROMPTS[0], temperature=0.0, max_tokens=2) as tracer:
            hit = list().save()
            for _ in tracer.iter[5]:
                hit.append(model.logits.output)
    assert hit == [] and any("never ran" in str(w.message) for w in caught)
    with pytest.raises(MissedValueError, match="finished after 2 step"):
        with model.trace(temperature=0.0) as tracer:
            with tracer.invoke(PROMPTS[0], max_tokens=2):
                tracer.next(3)
                model.logits.output.save()
            with tracer.invoke(PROMPTS[1], max_tokens=5):
                pass


def test_engine_is_clean_after_an_error_and_after_stop(model):
    with pytest.raises(ValueError, match="boom"):
        with model.trace(PROMPTS[0], temperature=0.0, max_tokens=4) as tracer:
            for step in tracer.iter[:]:
                if step == 1:
                    raise ValueError("boom")
                model.logits.output
    assert not model.llm.llm_engine.has_unfinished_requests()
    assert "compute_logits" not in _runner(model).model.__dict__
    with pytest.raises(ZeroDivisionError):  # raised while vLLM is sampling
        with model.trace(PROMPTS[1], temperature=0.0, max_tokens=4) as tracer:
            for step in tracer.iter[:]:
                token = int(model.samples.output[0, 0])
                if step == 2:
                    token / 0
    assert not model.llm.llm_engine.has_unfinished_requests()
    assert "_sample" not in _runner(model).__dict__
    with model.trace(PROMPTS[0], temperature=0.0, max_tokens=4) as tracer:
        first = model.model.layers[0].output[0].save()
        tracer.stop()
    assert first.shape[0] == len(model.tokenizer(PROMPTS[0])["input_ids"])
    assert not model.llm.llm_engine.has_unfinished_requests()
    saved = _three_invokes(model, lambda m: [m.samples])
    assert [[int(s[0]) for s in steps] for steps in saved] == plain_generate(model, PROMPTS, MAX_TOKENS)


def test_import_does_not_need_vllm():
    code = (
        "import sys, nnsight; from nnsight.modeling.vllm import VLLM; "
        "assert 'vllm' not in sys.modules, 'vllm imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
