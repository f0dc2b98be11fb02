"""Several invokes share one batched forward; each sees and edits only its own rows."""

import pytest
import torch

from nnsight import NNsight
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
    with pytest.raises(Exception, match="nothing to run"):
        with model.trace() as tracer:
            with tracer.invoke():
                model.output.save()


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
