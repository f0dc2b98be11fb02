"""Co-batching in the worker (no HTTP): requests sharing one forward see, edit and report only their own rows.

The oracle for every request is the same request run alone through the same sandbox path.
"""

from __future__ import annotations

import pytest
import torch

import nnsight

pytest.importorskip("RestrictedPython")
pytest.importorskip("greenlet")

from nnsight import LanguageModel  # noqa: E402
from nnsight.remote.serialize import decode_values  # noqa: E402
from nnsight.sandbox.guards import Guards  # noqa: E402
from nnsight.sandbox.runner import describe_error, forget, run_request  # noqa: E402
from nnsight.server.cobatch import CoBatchGuards, plan_batches, run_group, uses_whole_forward  # noqa: E402

VARS = {"model": {"$t": "envoy", "path": "model"}, "torch": {"$t": "module", "name": "torch"}}
PROMPTS = ["The cat sat on", "A dog ran to", "One bird flew by", "A red car went"]  # same token width


@pytest.fixture(scope="module")
def model(gpt2_module, gpt2_tokenizer):
    return LanguageModel(gpt2_module, tokenizer=gpt2_tokenizer)


def job(i, body, prompt=None):
    return {"id": f"cb{i}", "request": {"source": body, "body_lineno": 2, "kind": "trace", "filename": "u.py",
                                        "inputs": [prompt or PROMPTS[i % len(PROMPTS)]], "variables": VARS}}


def _decode(job_, outcome):
    if isinstance(outcome, BaseException):
        return describe_error(outcome, job_["id"], "u.py")
    return decode_values(*outcome)


def together(model, jobs, prints=None, batches=None):
    """Run ``jobs`` as one co-batch; ``batches`` collects the batch size of each lm_head forward (a plain hook)."""
    guards = CoBatchGuards(model)
    hook = model.lm_head._module.register_forward_hook(lambda m, i, o: batches.append(o.shape[0])) if batches is not None else None

    def run_one(j, make_context):
        sink = (prints.setdefault(j["id"], []).append) if prints is not None else (lambda s: None)
        return run_request(model, guards, j["request"], j["id"], sink, make_context=make_context)

    out = {}
    try:
        for j, outcome in run_group(model, jobs, run_one):
            out[j["id"]] = _decode(j, outcome)
            forget(j["id"])
    finally:
        if hook is not None:
            hook.remove()
    assert set(out) == {j["id"] for j in jobs}
    return out


def alone(model, j):
    try:
        outcome = run_request(model, Guards(model), j["request"], j["id"] + "solo", lambda s: None)
    except Exception as error:  # noqa: BLE001 - compared with the co-batched error below
        outcome = error
    forget(j["id"] + "solo")
    return _decode(j, outcome)


def assert_same(batched, solo):
    assert batched.keys() == solo.keys()
    for name in solo:
        a, b = batched[name], solo[name]
        if isinstance(b, torch.Tensor):
            assert a.shape == b.shape, name
            # One forward over more rows may take other BLAS paths: equal to 1e-5, not bitwise.
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert a == b, name


TYPICAL = "    h0 = model.transformer.h[0].output.save()\n    model.transformer.h[1].mlp.output[:] = 0\n" \
          "    logits = model.lm_head.output.save()\n"


def test_batched_requests_equal_solo_runs(model):
    jobs = [job(i, TYPICAL) for i in range(4)]
    assert [len(g) for g in plan_batches(model, jobs, 8)] == [4]
    batches = []
    out = together(model, jobs, batches=batches)
    assert batches == [4]  # one forward for the four requests
    for j in jobs:
        assert out[j["id"]]["logits"].shape[0] == 1
        assert_same(out[j["id"]], alone(model, j))


HOSTILE = {
    "read the whole batch": "    ids = model.transformer.wte.input.save()\n    rows = model.lm_head.output.shape[0]\n"
                            "    everything = model.lm_head.output.save()\n    result_rows = model.output.logits.shape[0]\n",
    "write past its rows": "    model.transformer.h[0].mlp.output[1:] = 1000.0\n    model.transformer.h[0].mlp.output[-8:] = 500.0\n"
                           "    model.transformer.h[1].output[:] = 0\n    after = model.lm_head.output.save()\n",
    "infer the batch size": "    ids = model.transformer.inputs[0][0].save()\n    mask = model.transformer.inputs[1]['attention_mask'].save()\n"
                            "    sizes = torch.tensor([model.transformer.wte.output.size(0), model.transformer.h[0].output.shape[0], "
                            "len(model.lm_head.output)]).save()\n",
    "write a batch-sized tensor": "    model.transformer.h[0].mlp.output[:] = torch.zeros(4, 4, 32)\n    x = model.lm_head.output.save()\n",
}


def attacked(model, victims, attacker):
    """Co-batch ``attacker`` among ``victims``: they come out as if it did not exist, it as if alone; returns its outcome and the forwards' sizes."""
    batches = []
    out = together(model, [victims[0], attacker, *victims[1:]], batches=batches)
    for v in victims:
        assert_same(out[v["id"]], alone(model, v))
    mine, solo = out[attacker["id"]], alone(model, attacker)
    if "type" in solo:  # the attack fails alone too: the same error, and only for the attacker
        assert mine["type"] == solo["type"]
    else:
        assert_same(mine, solo)
    return mine, batches


@pytest.mark.parametrize("what", sorted(HOSTILE))
def test_hostile_request_sees_only_its_rows(model, what):
    mine, batches = attacked(model, [job(i, TYPICAL) for i in (0, 2, 3)], job(1, HOSTILE[what]))
    assert batches == [4]  # one shared forward, the attacker included
    if what == "read the whole batch":
        assert mine["everything"].shape[0] == 1 and mine["ids"].shape[0] == 1
    if what == "infer the batch size":
        assert mine["sizes"].tolist() == [1, 1, 1] and mine["ids"].shape[0] == mine["mask"].shape[0] == 1


@pytest.mark.parametrize("escape", ["x.as_strided((4, 4, 32), (128, 32, 1))", "torch.as_strided(x, (4, 4, 32), (128, 32, 1))",
                                    "x.storage_offset()", "x.untyped_storage()"])
def test_views_cannot_reach_batch_mates_storage(model, escape):
    attacker = job(1, f"    x = model.transformer.h[0].mlp.output\n    y = {escape}\n    leaked = model.lm_head.output.save()\n")
    victims = [job(0, TYPICAL), job(2, TYPICAL)]
    out = together(model, [victims[0], attacker, victims[1]])
    assert out[attacker["id"]]["type"] == "SandboxError"
    for v in victims:
        assert_same(out[v["id"]], alone(model, v))


def test_an_error_fails_only_its_request_and_prints_stay_own(model):
    bad = job(1, "    print('bad one')\n    h = model.transformer.h[0].output\n    z = 1 / 0\n")
    good = [job(i, f"    print('good', {i})\n" + TYPICAL) for i in (0, 2)]
    prints = {}
    out = together(model, [good[0], bad, good[1]], prints)
    assert out["cb1"]["type"] == "ZeroDivisionError"
    assert [f["lineno"] for f in out["cb1"]["traceback"]][-1] == 4
    assert "".join(prints["cb1"]) == "bad one\n"
    assert "".join(prints["cb0"]) == "good 0\n" and "".join(prints["cb2"]) == "good 2\n"
    for g in good:
        assert_same(out[g["id"]], alone(model, g))


def test_a_missed_value_fails_only_its_request(model):
    bad = job(1, "    late = model.transformer.h[0].output.save()\n    early = model.transformer.wte.output.save()\n")
    good = job(0, TYPICAL)
    out = together(model, [good, bad])
    assert out["cb1"]["type"] == alone(model, bad)["type"] != "RemoteError"
    assert_same(out["cb0"], alone(model, good))


@pytest.mark.parametrize("body", [
    "    model.transformer.h[0].output[:] = 0\n    tracer.stop()\n",
    "    with tracer.invoke('Other prompt'):\n        a = model.lm_head.output.save()\n",
    "    model.transformer.h[0].output.requires_grad_(True)\n",
    "    model.transformer.h[0].skip(model.transformer.h[0].input)\n",
])
def test_whole_forward_features_run_alone(model, body):
    request = job(1, body)["request"]
    assert uses_whole_forward(request)
    groups = plan_batches(model, [job(0, TYPICAL), {"id": "x", "request": request}, job(2, TYPICAL)], 8)
    assert [len(g) for g in groups] == [2, 1]


def test_different_widths_and_inputs_are_not_mixed(model):
    jobs = [job(0, TYPICAL), job(1, TYPICAL, prompt="A much longer prompt than the others here"), job(2, TYPICAL)]
    jobs.append({"id": "ids", "request": {**job(3, TYPICAL)["request"], "inputs": [[1, 2, 3, 4]]}})
    assert [[j["id"] for j in g] for g in plan_batches(model, jobs, 8)] == [["cb0", "cb2"], ["cb1"], ["ids"]]
    assert [len(g) for g in plan_batches(model, [job(i, TYPICAL) for i in range(5)], 2)] == [2, 2, 1]


def test_weight_writes_are_refused_for_the_writer_only(model):
    before = model.lm_head.weight.detach().clone()
    bad = job(1, "    model.lm_head.weight[0] = 1\n    x = model.lm_head.output.save()\n")
    good = job(0, TYPICAL)
    out = together(model, [good, bad])
    assert out["cb1"]["type"] == "SandboxError"
    assert_same(out["cb0"], alone(model, good))
    assert torch.equal(model.lm_head.weight, before)


def test_a_request_that_loops_times_out_alone(model):
    loop = job(1, "    h = model.transformer.h[0].output\n    while True:\n        try:\n            pass\n        except Exception:\n            pass\n")
    good = [job(0, TYPICAL), job(2, TYPICAL)]
    guards = CoBatchGuards(model)
    out = {}
    run_one = lambda j, make_context: run_request(model, guards, j["request"], j["id"], lambda s: None,  # noqa: E731
                                                 make_context=make_context)
    for j, outcome in run_group(model, [good[0], loop, good[1]], run_one, timeout=0.5, timeout_message="too long"):
        out[j["id"]] = outcome
        forget(j["id"])
    assert type(out["cb1"]).__name__ == "JobTimeout" and str(out["cb1"]) == "too long"
    for g in good:
        assert_same(decode_values(*out[g["id"]]), alone(model, g))


def test_a_co_batch_leaves_local_tracing_as_it_was(model):
    together(model, [job(i, TYPICAL) for i in range(3)])
    with model.trace("Hello"):
        kept = model.lm_head.output.save()
        dropped = model.lm_head.output.sum()
    assert kept.shape[0] == 1
    with pytest.raises(NameError):
        dropped  # noqa: B018 - unsaved names are not bound after a local trace, co-batch or not


# -- generate: requests with equal, fixed-length greedy settings share one generate ----------

FIXED = {"max_new_tokens": 3, "min_new_tokens": 3}


def gen_job(i, body, kwargs=FIXED, prompt=None):
    request = job(i, body, prompt)["request"]
    return {"id": f"g{i}", "request": {**request, "kind": "generate", "kwargs": dict(kwargs), "as_name": "tracer"}}


STEPS = ("    first = model.transformer.h[0].output.save()\n    steps = []\n    for step in tracer.iter[:]:\n"
         "        model.transformer.h[1].mlp.output[:, -1] = model.transformer.h[1].mlp.output[:, -1] * 0.5\n"
         "        steps.append(model.lm_head.output[:, -1])\n    steps = torch.stack(steps).save()\n"
         "    tokens = tracer.result.save()\n")


def test_generate_requests_equal_solo_runs(model):
    jobs = [gen_job(i, STEPS) for i in range(4)]
    assert [len(g) for g in plan_batches(model, jobs, 8)] == [4]
    batches = []
    out = together(model, jobs, batches=batches)
    assert batches == [4, 4, 4]  # one generate: three steps over the four requests' rows
    for j in jobs:
        mine = out[j["id"]]
        assert mine["tokens"].shape == (1, 4 + 3) and mine["steps"].shape == (3, 1, mine["steps"].shape[-1])
        solo = alone(model, j)
        assert torch.equal(mine["tokens"], solo["tokens"])  # greedy tokens bit-identical
        assert_same(mine, solo)
    assert len({tuple(out[j["id"]]["tokens"][0].tolist()) for j in jobs}) == 4  # each got its own prompt's tokens


def test_generate_settings_decide_who_shares(model):
    body = "    tokens = model.generator.output.save()\n"
    jobs = [gen_job(0, body), gen_job(1, body, {"max_new_tokens": 2, "min_new_tokens": 2}), gen_job(2, body),
            gen_job(3, body, {**FIXED, "do_sample": True}),  # sampling: one random stream in batch order
            gen_job(4, body, {"max_new_tokens": 3}),  # may end early at its end-of-sequence token: shares with g11
            gen_job(5, "    r = tracer.result.save()\n"), gen_job(6, body, {**FIXED, "num_beams": 2}),
            gen_job(7, body, {**FIXED, "streamer": None}), gen_job(8, body, prompt="A much longer prompt than the others"),
            job(9, body), gen_job(10, body, {**FIXED, "temperature": 1.0}), gen_job(11, body, {"max_new_tokens": 3})]
    groups = [[j["id"] for j in g] for g in plan_batches(model, jobs, 8)]
    # g5 reads tracer.result: in a generate that is its own rows of the ids, so it shares (g0's batch).
    assert groups == [["g0", "g2", "g5"], ["g1"], ["g3"], ["g4", "g11"], ["g6"], ["g7"], ["g8"], ["cb9"], ["g10"]]
    assert uses_whole_forward(job(0, "    for s in tracer.iter[:]:\n        pass\n")["request"])
    assert not uses_whole_forward(gen_job(0, "    for s in tracer.iter[:]:\n        pass\n")["request"])


GENERATE_HOSTILE = {
    "read the whole batch": "    sizes = []\n    for step in tracer.iter[:]:\n        sizes.append(model.lm_head.output.shape[0])\n"
                            "        sizes.append(model.generator.streamer.output.shape[0])\n"
                            "    sizes = torch.tensor(sizes).save()\n    tokens = model.generator.output.save()\n",
    "write past its rows": "    for step in tracer.all():\n        model.transformer.h[0].mlp.output[1:] = 1000.0\n"
                           "        model.transformer.h[0].mlp.output[-8:] = 500.0\n"
                           "        model.transformer.h[1].output[:] = 0\n    tokens = model.generator.output.save()\n",
    "write a batch-sized tensor": "    for step in tracer.iter[0:2]:\n        model.transformer.h[0].mlp.output[:] = torch.zeros(4, 4, 32)\n",
    "replace an output with another shape": "    for step in tracer.iter[0:2]:\n        model.transformer.h[0].mlp.output = torch.zeros(4, 4, 7)\n",
}


@pytest.mark.parametrize("what", sorted(GENERATE_HOSTILE))
def test_hostile_generate_request_sees_only_its_rows(model, what):
    mine, batches = attacked(model, [gen_job(i, STEPS) for i in (0, 2, 3)], gen_job(1, GENERATE_HOSTILE[what]))
    assert batches[0] == 4  # one shared generate, the attacker included
    if what == "read the whole batch":
        assert set(mine["sizes"].tolist()) == {1} and mine["tokens"].shape[0] == 1


def test_a_generate_error_fails_only_its_request(model):
    bad = gen_job(1, "    for step in tracer.iter[:]:\n        if step == 1:\n            z = 1 / 0\n")
    good = [gen_job(i, STEPS) for i in (0, 2)]
    out = together(model, [good[0], bad, good[1]])
    assert out["g1"]["type"] == "ZeroDivisionError"
    for g in good:
        assert_same(out[g["id"]], alone(model, g))


# -- generate: a request that reaches its end-of-sequence token ends there, its batch-mates go on ----------

UNTIL_EOS = {"max_new_tokens": 6}
EOS_AT = 2  # the step at which "The cat sat on" (under STEPS) emits the model's end-of-sequence token
CAT, DOG, BIRD, CAR = range(4)  # indices into PROMPTS


@pytest.fixture(scope="module")
def eos_model(gpt2_module, gpt2_tokenizer):
    """The test GPT-2 with end-of-sequence ids that "The cat sat on" emits at step EOS_AT and "A red car
    went" at step 0, while the dog's and the bird's prompts never do (checked here, on the model's own tokens)."""
    import copy

    model = LanguageModel(copy.deepcopy(gpt2_module), tokenizer=gpt2_tokenizer)
    free = [alone(model, gen_job(i, STEPS, {"max_new_tokens": 6, "min_new_tokens": 6}))["tokens"][0, 4:].tolist()
            for i in range(4)]
    stop, early = free[CAT][EOS_AT], free[CAR][0]
    never = free[DOG] + free[BIRD]
    assert stop not in free[CAT][:EOS_AT] and stop not in never and early not in never + free[CAT], free
    model._module.generation_config.eos_token_id = [stop, early]
    return model


def multi_job(name, prompts, body=STEPS):
    request = gen_job(0, body, UNTIL_EOS)["request"]
    return {"id": name, "request": {**request, "inputs": [list(prompts)]}}


def test_a_request_ending_at_eos_equals_its_solo_run(eos_model):
    jobs = [gen_job(i, STEPS, UNTIL_EOS) for i in (CAT, DOG, BIRD)]
    assert [len(g) for g in plan_batches(eos_model, jobs, 8)] == [3]
    batches = []
    out = together(eos_model, jobs, batches=batches)
    assert batches == [3] * 6  # one shared generate: the dog and the bird go on after the cat has ended
    cat, dog = out[f"g{CAT}"], out[f"g{DOG}"]
    assert cat["tokens"].shape == (1, 4 + EOS_AT + 1) and cat["steps"].shape[0] == EOS_AT + 1  # its loop ended at its EOS
    assert dog["tokens"].shape == (1, 4 + 6) and dog["steps"].shape[0] == 6
    for j in jobs:
        solo = alone(eos_model, j)
        assert torch.equal(out[j["id"]]["tokens"], solo["tokens"])
        assert_same(out[j["id"]], solo)


def test_a_request_with_several_rows_ends_when_all_are_done(eos_model):
    pair = multi_job("pair", [PROMPTS[CAT], PROMPTS[CAR]])  # the car's row finishes at step 0, the cat's at EOS_AT
    jobs = [pair, gen_job(DOG, STEPS, UNTIL_EOS)]
    batches = []
    out = together(eos_model, jobs, batches=batches)
    assert batches == [3] * 6
    mine, solo = out["pair"], alone(eos_model, pair)
    assert mine["tokens"].shape == (2, 4 + EOS_AT + 1) and mine["steps"].shape[:2] == (EOS_AT + 1, 2)
    pad = eos_model.tokenizer.eos_token_id  # the pad id generate is given (the tokenizer has no pad token)
    assert mine["tokens"][1, 5:].tolist() == [pad] * EOS_AT  # its finished row carries pads, as alone
    assert torch.equal(mine["tokens"], solo["tokens"])
    assert_same(mine, solo)
    assert_same(out[f"g{DOG}"], alone(eos_model, jobs[1]))


HALVE = "        model.transformer.h[1].mlp.output[:, -1] = model.transformer.h[1].mlp.output[:, -1] * 0.5\n"  # as STEPS
AFTER_THE_END = {  # each edits every step it sees as STEPS does, so the cat still ends at EOS_AT
    "a bounded loop past its end": "    seen = []\n    for step in tracer.iter[0:6]:\n" + HALVE + "        seen.append(step)\n"
                                   "        seen.append(int(model.generator.streamer.output[0]))\n"
                                   "    seen = torch.tensor(seen).save()\n    tokens = model.generator.output.save()\n",
    "a read after its last step": "    for step in tracer.iter[:]:\n" + HALVE + "        last = model.lm_head.output.save()\n"
                                  "    after = model.transformer.h[0].output.save()\n",
    "a step it never reached": "    for step in tracer.iter[0:6]:\n" + HALVE + "        if step == 4:\n"
                               "            late = model.lm_head.output.save()\n",
}


@pytest.mark.parametrize("what", sorted(AFTER_THE_END))
def test_an_ended_request_sees_no_later_step(eos_model, what):
    ending = gen_job(CAT, AFTER_THE_END[what], UNTIL_EOS)
    out = together(eos_model, [ending, gen_job(DOG, STEPS, UNTIL_EOS)])
    mine, solo = out[ending["id"]], alone(eos_model, ending)
    if "type" in solo:  # a value after its end is missed, as in its solo run
        assert mine["type"] == solo["type"] == "MissedValueError"
        if what == "a step it never reached":  # a module it used before: the same words too
            assert mine["message"] == solo["message"]
    else:
        assert_same(mine, solo)
    if what == "a bounded loop past its end":
        assert mine["seen"].tolist()[::2] == list(range(EOS_AT + 1)) and torch.equal(mine["tokens"], solo["tokens"])
    if what == "a step it never reached":
        assert "late" not in mine and "late" not in solo
    assert out[f"g{DOG}"]["steps"].shape[0] == 6


@pytest.mark.parametrize("what", sorted(GENERATE_HOSTILE))
def test_hostile_generate_request_beside_requests_that_end_early(eos_model, what):
    victims = [gen_job(i, STEPS, UNTIL_EOS) for i in (CAT, BIRD)]
    attacker = gen_job(DOG, GENERATE_HOSTILE[what], UNTIL_EOS)  # never ends early: it runs on after the cat
    attacked(eos_model, victims, attacker)


def test_local_invokes_see_every_step_as_in_nnsight_081(eos_model):
    # nnsight 0.8.1: in a local generate every invoke runs to the batch's end, EOS or not.
    with eos_model.generate(max_new_tokens=6) as tracer:
        with tracer.invoke(PROMPTS[CAT]):
            cat_steps = [step for step in tracer.iter[:]]
            cat_steps = nnsight.save(cat_steps)
            cat = tracer.result.save()
        with tracer.invoke(PROMPTS[DOG]):
            dog = tracer.result.save()
    assert cat_steps == list(range(6)) and cat.shape == dog.shape == (1, 4 + 6)
