"""remote=True end to end: a real `nnsight serve` subprocess, the README-style examples
(trace, generate, session, gradients) compared with the same code run locally.

Tests marked ``every_mode`` also run against the shared Ray-mode server (conftest ``ray_server``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("RestrictedPython")
transformers = pytest.importorskip("transformers")

from nnsight import CONFIG, LanguageModel  # noqa: E402
from nnsight.remote import SandboxError, UnsupportedValue  # noqa: E402
from nnsight.remote.client import JobError  # noqa: E402
from remote_support import connect, remote_config, serve_tiny  # noqa: E402,F401


@pytest.fixture(scope="module")
def served(server_mode, tmp_path_factory, request):
    if server_mode == "ray":
        server = request.getfixturevalue("ray_server")
        yield server, server.keys["alice"], server.folder
        return
    yield from serve_tiny(tmp_path_factory, "remote")


@pytest.fixture
def models(served, remote_config):
    return connect(served, remote_config)


def test_remote_model_is_built_on_meta_from_the_servers_config(models):
    remote, local = models
    assert next(remote._module.parameters()).is_meta
    assert remote.config.n_layer == local.config.n_layer == 2
    assert remote.tokenizer("Hello")["input_ids"] == local.tokenizer("Hello")["input_ids"]


@pytest.mark.every_mode
def test_trace_matches_local(models):
    remote, local = models
    results = []
    for model, remote_flag in ((remote, True), (local, False)):
        with model.trace("The Eiffel Tower is in the city of", remote=remote_flag):
            model.transformer.h[0].output[0][:] = 0
            hidden_states = model.transformer.h[-1].output[0].save()
            not_saved = model.lm_head.output
            output = model.output.save()
        results.append((hidden_states, output))
    (rh, ro), (lh, lo) = results
    assert "not_saved" not in locals()
    assert torch.allclose(rh, lh, atol=1e-6)
    assert torch.allclose(ro["logits"], lo["logits"], atol=1e-5)


@pytest.mark.every_mode
def test_values_from_the_callers_scope_and_functions(models):
    remote, local = models
    patch = torch.ones(32) * 0.5
    layers = [0, 1]
    scale = 2.0
    outs = {}
    for model, flag in ((remote, True), (local, False)):
        with model.trace("Hello world", remote=flag) as tracer:
            acts = []
            for i in layers:
                model.transformer.h[i].mlp.output[0, -1] = patch * scale
                acts.append(model.transformer.h[i].output[0].save())
            normed = double(model.lm_head.output).save()
        outs[flag] = (acts, normed)
    for a, b in zip(outs[True][0], outs[False][0]):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(outs[True][1], outs[False][1], atol=1e-5)


def double(x):
    return x * 2


@pytest.mark.every_mode
def test_generate_matches_local(models):
    remote, local = models
    outs = {}
    for model, flag in ((remote, True), (local, False)):
        with model.generate("The Eiffel Tower is in", max_new_tokens=3, remote=flag) as tracer:
            tokens = list().save()
            for step in tracer.iter[:]:
                tokens.append(model.lm_head.output[0, -1].argmax(dim=-1))
            output = tracer.result.save()
        outs[flag] = (tokens, output)
    assert torch.equal(outs[True][1], outs[False][1])
    assert [int(t) for t in outs[True][0]] == [int(t) for t in outs[False][0]]


@pytest.mark.every_mode
def test_session_matches_local(models):
    remote, local = models
    outs = {}
    for model, flag in ((remote, True), (local, False)):
        with model.session(remote=flag) as session:
            with model.trace("Hello"):
                hs1 = model.transformer.h[0].output[0][:, -1].save()
            with model.trace("World"):
                model.transformer.h[0].output[0][:, -1] = hs1
                out = model.lm_head.output.save()
        outs[flag] = (hs1, out)
    assert torch.allclose(outs[True][0], outs[False][0], atol=1e-6)
    assert torch.allclose(outs[True][1], outs[False][1], atol=1e-5)


@pytest.mark.every_mode
def test_gradients_match_local(models):
    remote, local = models
    outs = {}
    for model, flag in ((remote, True), (local, False)):
        with model.trace("Hello", remote=flag):
            hs = model.transformer.h[-1].mlp.output  # a tensor under transformers 4 and 5; no requires_grad needed
            logits = model.lm_head.output
            loss = logits.sum()
            with loss.backward():
                grad = hs.grad.save()
        outs[flag] = grad
    assert outs[False].shape == (1, 1, 32) and outs[False].abs().sum() > 0
    assert torch.allclose(outs[True], outs[False], atol=1e-5)


@pytest.mark.every_mode
def test_print_streams_back(models, capsys):
    remote, local = models
    printed = []
    for model, flag in ((local, False), (remote, True)):
        with model.trace("Hello", remote=flag):
            hs = model.transformer.h[0].mlp.output
            print("shape is", tuple(hs.shape))
        printed.append(capsys.readouterr().out)
    assert "shape is (1, 1, 32)" in printed[0]  # the local oracle
    assert printed[1] == printed[0]


@pytest.mark.every_mode
def test_errors_come_back_as_the_same_type_at_the_users_line(models):
    remote, _ = models
    with pytest.raises(IndexError) as info:
        with remote.trace("Hello", remote=True):
            hs = remote.transformer.h[0].output[0]
            bad = hs[0, 99]
    assert info.traceback[-1].path.name == "test_remote.py"
    assert "bad = hs[0, 99]" in str(info.value)
    with pytest.raises(ZeroDivisionError):
        with remote.trace("Hello", remote=True):
            x = 1 / 0


def test_sandbox_refusal_is_raised_locally(models):
    remote, _ = models
    with pytest.raises(SandboxError, match="__class__"):
        with remote.trace("Hello", remote=True):
            k = remote.__class__


def test_unsendable_variable_is_named_before_sending(models):
    remote, _ = models
    handle = open(__file__)
    try:
        with pytest.raises(UnsupportedValue, match="variable 'handle'"):
            with remote.trace("Hello", remote=True):
                x = handle
    finally:
        handle.close()


@pytest.mark.every_mode
def test_non_blocking_returns_a_handle(models):
    remote, _ = models
    with remote.trace("Hello", remote=True, blocking=False) as tracer:
        out = remote.lm_head.output.save()
    job = tracer.job
    values = job.wait(timeout=60)
    assert values["out"].shape == (1, 1, 50257)
    assert job.status()["status"] == "completed"


def test_bad_key_is_a_clear_error(models, remote_config):
    remote, _ = models
    remote_config.API.APIKEY = "nns_wrong"
    with pytest.raises(JobError, match="401"):
        with remote.trace("Hello", remote=True):
            out = remote.lm_head.output.save()


def test_config_persists_the_api_key(remote_config, tmp_path, monkeypatch):
    remote_config.set_default_api_key("nns_saved")
    assert (tmp_path / "config" / "config.json").stat().st_mode & 0o077 == 0
    CONFIG.API.APIKEY = None
    CONFIG.load()
    assert CONFIG.API.APIKEY == "nns_saved"
    monkeypatch.setenv("NNSIGHT_API_KEY", "nns_env")
    monkeypatch.setenv("NNSIGHT_HOST", "http://127.0.0.1:9")
    CONFIG.load()
    assert CONFIG.API.APIKEY == "nns_env" and CONFIG.API.HOST == "http://127.0.0.1:9"


def test_local_weights_are_never_loaded_for_a_remote_model(models):
    remote, _ = models
    with pytest.raises(Exception, match="no local weights"):
        with remote.trace("Hello"):
            out = remote.lm_head.output.save()
