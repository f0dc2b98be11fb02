"""Traces in several threads at once: every piece of per-trace state belongs to its trace.

A barrier keeps the threads inside their traces at the same moment, many times over,
and every saved value is compared with a plain forward of that thread's own input.
"""

import threading

import torch

from nnsight import NNsight


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))


def _run_threads(work, n_threads):
    errors = []

    def guarded(i):
        try:
            work(i)
        except BaseException as error:  # reported to the test below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not [t for t in threads if t.is_alive()], "a thread hung"
    assert not errors, errors[0]


def _overlapping(models, rounds=60):
    n = len(models)
    inside = threading.Barrier(n, timeout=30)
    wrong = []

    def work(i):
        model, net = models[i]
        for r in range(rounds):
            x = torch.randn(3, 8) + i * 10 + r
            with model.trace(x):
                inside.wait()  # every thread is inside a trace now, its model paused at layer 0
                a = model[0].output.save()
                model[1].output = model[1].output * 2
                out = model.output.save()
            with torch.no_grad():
                expected_a = net[0](x)
                expected_out = net[2](net[1](expected_a) * 2)
            if not (torch.allclose(a, expected_a) and torch.allclose(out, expected_out)):
                wrong.append((i, r))

    _run_threads(work, n)
    assert not wrong, f"saved values from another thread's computation: {wrong[:5]}"


def test_four_threads_each_with_its_own_model():
    nets = [_net(i) for i in range(4)]
    _overlapping([(NNsight(net), net) for net in nets])


def test_two_threads_on_the_same_model():
    net = _net(0)
    model = NNsight(net)
    _overlapping([(model, net), (model, net)])
    assert "forward" not in net[0].__dict__ and "forward" not in net[2].__dict__


def test_threads_tracing_one_model_while_another_runs_plain():
    net = _net(1)
    model = NNsight(net)
    x = torch.randn(2, 8)
    expected = net(x)
    stop = threading.Event()
    plain_wrong = []

    def plain():
        while not stop.is_set():
            if not torch.allclose(net(x), expected):
                plain_wrong.append(1)

    runner = threading.Thread(target=plain)
    runner.start()
    try:
        for _ in range(200):
            with model.trace(x):
                model[2].output = model[2].output * 0
                out = model.output.save()
            assert torch.equal(out, torch.zeros_like(out))
    finally:
        stop.set()
        runner.join()
    assert not plain_wrong, "a plain forward in another thread saw this thread's intervention"
