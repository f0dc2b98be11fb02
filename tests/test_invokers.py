"""Several invokes share one batched forward; each sees and edits only its own rows."""

import pytest
import torch

from conftest import FIXTURES

from nnsight import InvokeError, NNsight
from nnsight import save as nnsight_save


def test_each_invoke_sees_its_rows_and_one_forward_runs(seq):
    a, b = torch.rand(1, 5), torch.rand(2, 5)
    model = NNsight(seq)
    calls = []
    handle = seq.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with model.trace() as tracer:
        with tracer.invoke(a):
            out_a = model[0].output.save()
        with tracer.invoke(b):
            out_b = model[0].output.save()
        with tracer.invoke():
            out_all = model[0].output.save()
    handle.remove()
    assert calls == [3]
    assert torch.allclose(out_a, seq[0](a)) and torch.allclose(out_b, seq[0](b))
    assert out_all.shape == (3, 10)


def test_edit_in_one_invoke_only_touches_its_rows(seq):
    a, b = torch.rand(1, 5), torch.rand(1, 5)
    model = NNsight(seq)
    with model.trace() as tracer:
        with tracer.invoke(a):
            model[0].output[:] = 0
            out_a = model.output.save()
        with tracer.invoke(b):
            out_b = model.output.save()
    assert torch.allclose(out_a, seq[2](torch.zeros(1, 10)))
    assert torch.allclose(out_b, seq(b))


def test_assignment_in_one_invoke_only_touches_its_rows(seq):
    a, b = torch.rand(1, 5), torch.rand(1, 5)
    model = NNsight(seq)
    with model.trace() as tracer:
        with tracer.invoke(a):
            out_a = model.output.save()
        with tracer.invoke(b):
            model[0].output = model[0].output * 0
            out_b = model.output.save()
    assert torch.allclose(out_a, seq(a))
    assert torch.allclose(out_b, seq[2](torch.zeros(1, 10)))


def test_cross_invoke_value_as_in_the_readme(gpt2):
    """Capture the embedding output in invoke 1 and write it into invoke 2, no barrier."""
    model = NNsight(gpt2)
    first, second = torch.tensor([[464, 412, 733]]), torch.tensor([[62, 4808, 4808]])
    with model.trace() as tracer:
        with tracer.invoke(first):
            embeddings = model.transformer.wte.output
            out1 = model.lm_head.output.save()
        with tracer.invoke(second):
            model.transformer.wte.output = embeddings
            out2 = model.lm_head.output.save()
    assert torch.allclose(out1, out2, atol=1e-5)
    assert torch.allclose(out1, gpt2(first).logits, atol=1e-5)


def test_invokes_run_in_written_order(seq):
    model = NNsight(seq)
    with model.trace() as tracer:
        order = list().save()
        with tracer.invoke(torch.rand(1, 5)):
            model[0].output
            order.append("first")
        with tracer.invoke(torch.rand(1, 5)):
            model[0].output
            order.append("second")
    assert order == ["first", "second"]


def test_invokes_in_a_loop_freeze_the_loop_variable(seq):
    model = NNsight(seq)
    inputs = [torch.rand(1, 5) for _ in range(3)]
    with model.trace() as tracer:
        outs = list().save()
        for i, x in enumerate(inputs):
            with tracer.invoke(x):
                outs.append((i, model.output))
    assert [i for i, _ in outs] == [0, 1, 2]
    for i, out in outs:
        assert torch.allclose(out, seq(inputs[i]))


def test_barrier(gpt2):
    model = NNsight(gpt2)
    ids = torch.tensor([[464, 412, 733]])
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(ids):
            emb = model.transformer.wte.output
            barrier()
            out1 = model.lm_head.output.save()
        with tracer.invoke(torch.tensor([[1, 2, 3]])):
            barrier()
            model.transformer.wte.output = emb
            out2 = model.lm_head.output.save()
    assert torch.allclose(out1, out2, atol=1e-5)


def test_trace_input_plus_explicit_invoke(seq):
    a, b = torch.rand(1, 5), torch.rand(1, 5)
    model = NNsight(seq)
    with model.trace(a) as tracer:
        with tracer.invoke(b):
            out_b = model.output.save()
    assert torch.allclose(out_b, seq(b))


def test_no_input_at_all_is_a_clear_error(seq):
    model = NNsight(seq)
    with pytest.raises(InvokeError, match=r"test_invokers\.py:\d+: nothing to run.*invokes have none"):
        with model.trace() as tracer:
            with tracer.invoke():
                model.output.save()


def test_trace_with_no_input_and_no_invokes_is_an_invoke_error(seq):
    model = NNsight(seq)
    with pytest.raises(InvokeError, match=r"test_invokers\.py:\d+: nothing to run.*has no invokes") as empty:
        with model.trace():
            x = 1
    assert isinstance(empty.value, ValueError)  # as 0.8.1 raises
    with pytest.raises(InvokeError, match=r"test_invokers\.py:\d+: model\[0\]\.output was read") as read:
        with model.trace():  # reads here
            model[0].output.save()
    assert _source_line(int(read.value.args[0].split(":")[1])).strip() == "with model.trace():  # reads here"
    assert seq[0].forward.__func__ is torch.nn.Linear.forward  # no hook left behind


def test_an_invoke_inside_an_invoke_is_an_invoke_error_at_its_line(seq):
    model = NNsight(seq)
    for inner_input in ((torch.rand(1, 5),), ()):
        with pytest.raises(InvokeError, match=r"test_invokers\.py:(\d+): an invoke cannot be opened inside") as nested:
            with model.trace() as tracer:
                with tracer.invoke(torch.rand(1, 5)):
                    with tracer.invoke(*inner_input):
                        model[0].output.save()
        line = int(nested.value.args[0].split(":")[1])
        assert _source_line(line).strip() == "with tracer.invoke(*inner_input):"
    with model.trace(torch.rand(1, 5)):  # the model is left usable, with no hook
        out = model.output.save()
    assert out.shape == (1, 2) and "forward" not in seq[0].__dict__


def _source_line(number):
    import pathlib

    return pathlib.Path(__file__).read_text().splitlines()[number - 1]


def _add_invoke(tracer, model, prompt, outs):
    """A helper that opens an invoke of the trace that calls it (as 0.8.1 users write)."""
    with tracer.invoke(prompt):
        hidden = model.transformer.h[0].output.save()
        outs.append((prompt, hidden, model.lm_head.output.save()))


def test_invokes_opened_in_a_helper_function(gpt2):
    from nnsight import LanguageModel

    tok = __import__("transformers").GPT2TokenizerFast.from_pretrained(str(FIXTURES / "gpt2-tokenizer"))
    model = LanguageModel(gpt2, tokenizer=tok)
    seen = []
    handle = gpt2.transformer.h[0].register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    prompts = ["Hello world", "The cat"]  # two tokens each: no padding to account for
    outs, hidden = [], None  # `hidden`, a local here: a function's locals are fixed when it compiles
    try:
        with model.trace() as tracer:
            _add_invoke(tracer, model, prompts[0], outs)
            with tracer.invoke(prompts[1]):          # mixed with one written in the block
                direct = model.lm_head.output.save()
            _add_invoke(tracer, model, prompts[1], outs)
    finally:
        handle.remove()
    # The helper's saved names reach the trace's caller, the last invoke's value winning (as in 0.8.1).
    assert hidden is outs[1][1]
    assert len(seen) == 1 and seen[0].shape[0] == 3  # one batched forward over all three invokes
    assert [p for p, _, _ in outs] == [prompts[0], prompts[1]]
    for row, (prompt, hidden_states, logits) in zip((0, 2), outs):
        ids = tok(prompt, return_tensors="pt")
        alone = gpt2(**ids).logits
        torch.testing.assert_close(hidden_states, seen[0][row : row + 1])
        torch.testing.assert_close(logits[:, -ids["input_ids"].shape[1]:], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(direct, outs[1][2])
    assert "forward" not in gpt2.transformer.h[0].__dict__


def test_later_invoke_reads_and_reassigns_an_earlier_invokes_name(seq):
    model = NNsight(seq)
    a, b = torch.rand(1, 5), torch.rand(1, 5)
    with model.trace() as tracer:
        with tracer.invoke(a):
            hs = model[0].output
        with tracer.invoke(b):
            mine = model[0].output  # by now the first invoke has set hs
            hs = hs * 2
            model[2].input = hs
            out = model.output.save()
    assert torch.allclose(out, seq[2](seq[0](a) * 2))


def test_both_invokes_loop_over_their_own_i(seq):
    model = NNsight(seq)
    a, b = torch.rand(1, 5), torch.rand(1, 5)
    with model.trace() as tracer:
        with tracer.invoke(a):
            firsts = []
            for i in range(2):
                firsts.append((i, model[2 * i].output[0, 0].item()))
            firsts = nnsight_save(firsts)
        with tracer.invoke(b):
            seconds = []
            for i in range(2):
                seconds.append((i, model[2 * i].output[0, 0].item()))
            seconds = nnsight_save(seconds)
    assert [i for i, _ in firsts] == [0, 1] and [i for i, _ in seconds] == [0, 1]
    assert firsts[1][1] == pytest.approx(seq(a)[0, 0].item(), abs=1e-6)
    assert seconds[1][1] == pytest.approx(seq(b)[0, 0].item(), abs=1e-6)


def test_invoke_code_runs_once_and_its_error_is_reported_at_once(seq, capsys):
    model = NNsight(seq)
    with pytest.raises(NameError, match="later_name"):
        with model.trace() as tracer:
            with tracer.invoke(torch.rand(1, 5)):
                h = model[0].output
                later_name = h * 2
            with tracer.invoke(torch.rand(1, 5)):
                print("second invoke starts")
                y = later_name + 1  # not set yet: the first invoke is still waiting at layer 0
    assert capsys.readouterr().out.count("second invoke starts") == 1


def test_a_helper_invoke_outside_its_trace_is_an_invoke_error(seq):
    model = NNsight(seq)
    with model.trace(torch.rand(1, 5)) as tracer:
        out = model.output.save()
    with pytest.raises(InvokeError, match="only be used while its `with model.trace"):
        with tracer.invoke(torch.rand(1, 5)):
            model.output.save()
    assert out.shape == (1, 2) and "forward" not in seq[0].__dict__


def test_a_barrier_fewer_invokes_reach_is_an_invoke_error(seq):
    model = NNsight(seq)
    with pytest.raises(InvokeError, match="barrier for 3 invokes was reached by only 2") as short:
        with model.trace() as tracer:
            barrier = tracer.barrier(3)
            with tracer.invoke(torch.rand(1, 5)):
                barrier()
            with tracer.invoke(torch.rand(1, 5)):
                barrier()
    assert isinstance(short.value, ValueError)  # as 0.8.1 raises
    assert "forward" not in seq[0].__dict__


def _add_generating_invoke(tracer, model, prompt, outs):
    with tracer.invoke(prompt):
        tokens = list()
        for step in tracer.iter[:]:
            tokens.append(model.lm_head.output[0, -1].argmax().item())
        outs.append(tokens)


@torch.no_grad()
def test_a_helper_invoke_loops_over_generation_steps(gpt2, gpt2_tokenizer):
    from nnsight import LanguageModel

    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    outs = []
    with model.generate(max_new_tokens=3, do_sample=False) as tracer:
        _add_generating_invoke(tracer, model, "Hello world", outs)
        _add_generating_invoke(tracer, model, "The cat", outs)
    for prompt, tokens in zip(("Hello world", "The cat"), outs):
        alone = gpt2.generate(**gpt2_tokenizer(prompt, return_tensors="pt"), max_new_tokens=3, do_sample=False,
                              pad_token_id=gpt2_tokenizer.eos_token_id)
        assert tokens == alone[0, -3:].tolist()
