"""Sessions: values flow between traces and are bound after the session."""

import torch

from nnsight import NNsight


def test_value_from_first_trace_used_in_second(seq):
    model = NNsight(seq)
    a, b = torch.rand(1, 5), torch.rand(1, 5)
    with model.session():
        with model.trace(a):
            hs1 = model[0].output.save()
        with model.trace(b):
            model[0].output[:] = hs1
            out2 = model.output.save()
    assert torch.allclose(out2, seq(a))
    assert torch.equal(hs1, seq[0](a))


def test_unsaved_value_of_one_trace_is_visible_to_the_next_inside_a_function(seq):
    model = NNsight(seq)
    a, b = torch.rand(1, 5), torch.rand(1, 5)

    def patched():
        with model.session():
            with model.trace(a):
                hs = model[2].inputs  # read, not saved
            with model.trace(b):
                model[2].input = hs[0][0]
                out = model.output.save()
        return out, locals()

    out, names = patched()
    assert torch.allclose(out, seq(a))  # layer 2 saw a's hidden state
    assert "hs" not in names  # only saved values outlive the session


def test_session_with_invokes_opened_in_a_loop(seq):
    model = NNsight(seq)
    prompts = [torch.rand(1, 5), torch.rand(1, 5), torch.rand(1, 5)]

    class Steering:
        def collect(self):
            with model.session():
                acts = []
                with model.trace() as tracer:
                    for p in prompts:
                        with tracer.invoke(p):
                            acts.append(model[0].output[:, -1].save())
            return acts

    acts = Steering().collect()
    assert len(acts) == 3
    for act, p in zip(acts, prompts):
        assert torch.allclose(act, seq[0](p)[:, -1])
