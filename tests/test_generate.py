"""Generation with per-step interventions, compared with plain generate and hand-written hooks."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nnsight import LanguageModel, NNsightDeprecationWarning, NNsightError  # noqa: E402


@pytest.fixture
def lm(gpt2, gpt2_tokenizer):
    return LanguageModel(gpt2, tokenizer=gpt2_tokenizer)


def _plain(gpt2, tok, prompt, n, hook=None, module=None):
    handle = module.register_forward_hook(hook) if hook else None
    try:
        enc = tok(prompt, return_tensors="pt")
        return gpt2.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    finally:
        if handle:
            handle.remove()


def test_generator_output_equals_plain_generate(lm, gpt2, gpt2_tokenizer):
    # model.generator.output is deprecated (as in nnsight 0.8.1), warns at this line, and still works.
    with pytest.warns(NNsightDeprecationWarning, match=r"^model\.generator\.output is deprecated.*tracer\.result") as record:
        with lm.generate("The Eiffel Tower is in", max_new_tokens=3) as tracer:
            output = lm.generator.output.save()
            result = tracer.result.save()
    assert [w.filename for w in record if w.category is NNsightDeprecationWarning] == [__file__]
    expected = _plain(gpt2, gpt2_tokenizer, "The Eiffel Tower is in", 3)
    assert torch.equal(output, expected) and torch.equal(result, expected)


def test_assigning_generator_output_warns_and_is_refused(lm):
    with pytest.warns(NNsightDeprecationWarning, match="tracer.result"):
        with pytest.raises(NNsightError, match="cannot be replaced"):
            with lm.generate("Hello", max_new_tokens=2):
                lm.generator.output = torch.zeros(1, 1, dtype=torch.long)


def test_streamer_output_and_tracer_result_do_not_warn(lm, gpt2, gpt2_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NNsightDeprecationWarning)
        with lm.generate("Hello", max_new_tokens=2) as tracer:
            steps = list().save()
            for step in tracer.iter[:]:
                steps.append(lm.generator.streamer.output)
            result = tracer.result.save()
    expected = _plain(gpt2, gpt2_tokenizer, "Hello", 2)
    assert torch.equal(result, expected) and torch.equal(torch.cat(steps), expected[0, -2:])


def test_iter_all_steps_saves_each_step(lm, gpt2, gpt2_tokenizer):
    seen = []
    handle = gpt2.lm_head.register_forward_hook(lambda m, i, o: seen.append(o[0][-1].argmax(-1)))
    _plain(gpt2, gpt2_tokenizer, "Hello", 5)
    handle.remove()
    with lm.generate("Hello", max_new_tokens=5) as tracer:
        logits = list().save()
        for step in tracer.iter[:]:
            logits.append(lm.lm_head.output[0][-1].argmax(dim=-1))
        after_loop = tracer.result.save()  # code after an open-ended loop runs
    assert [int(t) for t in logits] == [int(t) for t in seen]
    assert after_loop.shape[-1] == len(gpt2_tokenizer("Hello").input_ids) + 5


def test_conditional_step_intervention_equals_hook(lm, gpt2, gpt2_tokenizer):
    calls = {"n": 0}

    def zero_on_step_2(module, inputs, output):
        step = calls["n"]
        calls["n"] += 1
        if step == 2:
            output[0][:] = 0
        return output

    expected = _plain(gpt2, gpt2_tokenizer, "Hello", 5, zero_on_step_2, gpt2.transformer.h[0])
    with lm.generate("Hello", max_new_tokens=5) as tracer:
        outputs = list().save()
        for step_idx in tracer.iter[:]:
            if step_idx == 2:
                lm.transformer.h[0].output[0][:] = 0
            outputs.append(lm.transformer.h[-1].output[0])
        tokens = tracer.result.save()
    assert torch.equal(tokens, expected)
    assert len(outputs) == 5


@pytest.mark.parametrize("selection,steps", [(2, [2]), (slice(1, 3), [1, 2]), ([0, 2], [0, 2])])
def test_iter_selections(lm, selection, steps):
    with lm.generate("Hello", max_new_tokens=4) as tracer:
        got = list().save()
        for step in tracer.iter[selection]:
            got.append((step, lm.lm_head.output.shape[1]))
    assert [s for s, _ in got] == steps


def test_for_loop_form_and_all(lm):
    with lm.generate("Hello", max_new_tokens=3) as tracer:
        a = list().save()
        for step in tracer.all():
            a.append(step)
    assert a == [0, 1, 2]


def test_next_moves_to_the_following_step(lm, block_hidden):
    with lm.generate("Hello there", max_new_tokens=3) as tracer:
        first = block_hidden(lm.transformer.h[0].output).save()
        tracer.next()
        second = block_hidden(lm.transformer.h[0].output).save()
    assert first.shape[1] == 2 and second.shape[1] == 1


def test_unreached_step_warns_and_does_not_hang(lm):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lm.generate("Hello", max_new_tokens=3) as tracer:
            hit = list().save()
            for step in tracer.iter[10]:
                hit.append(lm.lm_head.output)
            done = True
            marker = [done].save()
    assert hit == [] and marker == [True]
    assert any("step(s) [10] never ran" in str(w.message) for w in caught)


def test_invokes_inside_generate(lm, gpt2, gpt2_tokenizer):
    with lm.generate(max_new_tokens=2) as tracer:
        with tracer.invoke("Hello"):
            a = tracer.result.save()
        with tracer.invoke("The Eiffel Tower is in"):
            b = tracer.result.save()
    assert torch.equal(b, _plain(gpt2, gpt2_tokenizer, "The Eiffel Tower is in", 2))
    assert a.shape == b.shape == (1, 9)  # "Hello" is left-padded to the longer prompt
