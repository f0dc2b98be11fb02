"""Saving values through a trace: they equal what plain forward hooks see, and bind like ordinary names."""

import threading

import pytest
import torch

import nnsight
from nnsight import NNsight


def hooked_outputs(module, x, names):
    """The oracle: outputs seen by plain register_forward_hook."""
    seen = {}
    handles = [
        dict(module.named_modules())[n].register_forward_hook(lambda m, i, o, n=n: seen.update({n: o.detach().clone()}))
        for n in names
    ]
    try:
        final = module(x)
    finally:
        for h in handles:
            h.remove()
    return seen, final


def test_save_equals_forward_hook(seq):
    x = torch.rand(3, 5)
    model = NNsight(seq)
    with model.trace(x):
        first = model[0].output.save()
        relu_in = model[1].input.save()
        last = model[2].output.save()
        out = model.output.save()
    seen, final = hooked_outputs(seq, x, ["0", "2"])
    assert torch.equal(first, seen["0"])
    assert torch.equal(relu_in, seen["0"])
    assert torch.equal(last, seen["2"])
    assert torch.equal(out, final)


def test_annotated_assignments_in_a_block(seq):
    x = torch.rand(3, 5)
    model = NNsight(seq)
    with model.trace(x):
        first: torch.Tensor = model[0].output.save()
        count: int
        last: "torch.Tensor" = model[2].output.save()
    seen, _ = hooked_outputs(seq, x, ["0", "2"])
    assert torch.equal(first, seen["0"]) and torch.equal(last, seen["2"])


def test_unsaved_names_are_not_bound(seq):
    model = NNsight(seq)
    with model.trace(torch.rand(1, 5)):
        hidden = model[0].output
        kept = model[2].output.save()
    assert kept.shape == (1, 2)
    with pytest.raises(UnboundLocalError):
        hidden  # noqa: B018


def test_module_level_trace_binds_globals(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import torch\nfrom nnsight import NNsight\n"
        "model = NNsight(torch.nn.Linear(2, 2))\n"
        "with model.trace(torch.ones(1, 2)):\n"
        "    out = model.output.save()\n"
        "    other = model.output * 2\n"
        "assert 'other' not in globals()\n"
        "result = out\n"
    )
    namespace = {"__name__": "script"}
    exec(compile(script.read_text(), str(script), "exec"), namespace)
    assert namespace["result"].shape == (1, 2)


def test_closure_locals_loops_comprehensions(seq):
    model = NNsight(seq)
    scale = 3.0
    names = [0, 2]

    def helper(t):
        return t * scale

    with model.trace(torch.rand(2, 5)):
        outs = [model[i].output for i in names]
        scaled = helper(outs[1]).save()
        total = 0
        for o in outs:
            total = total + o.sum()
        total = nnsight.save(total)
        squares = {k: v ** 2 for k, v in zip(names, outs)}
        sq = squares[2].save()
    assert scaled.shape == (2, 2)
    assert torch.allclose(sq, (scaled / 3.0) ** 2)
    assert torch.isfinite(total)



def test_nested_function_and_method():
    class Experiment:
        def __init__(self):
            torch.manual_seed(1)
            self.model = NNsight(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)))

        def run(self, x):
            def inner():
                with self.model.trace(x):
                    h = self.model[0].output.save()
                return h

            return inner()

    exp = Experiment()
    x = torch.rand(2, 3)
    assert torch.equal(exp.run(x), exp.model._module[0](x))


def test_saved_list_mutation_visible(seq):
    model = NNsight(seq)
    with model.trace(torch.rand(1, 5)):
        acts = list().save()
        acts.append(model[0].output)
        acts.append(model[2].output)
        meta = dict(n=1).save()
        meta["shape"] = acts[0].shape
    assert len(acts) == 2 and meta["shape"] == (1, 10)


def test_existing_variable_reassigned_only_if_saved(seq):
    model = NNsight(seq)
    value = "before"
    kept = "before"
    with model.trace(torch.rand(1, 5)):
        value = model[0].output + 1
        kept = model[0].output.save()
    assert value == "before"
    assert isinstance(kept, torch.Tensor)


def test_object_with_own_save_method_is_left_alone(seq):
    class Thing:
        def save(self, path=None):
            return "own save"

    model = NNsight(seq)
    with model.trace(torch.rand(1, 5)):
        result = Thing().save()
        out = model.output.save()
    assert out.shape == (1, 2)
    with pytest.raises(UnboundLocalError):
        result  # noqa: B018


def test_exec_of_string_gives_clear_error(seq):
    model = NNsight(seq)
    code = "with model.trace(torch.rand(1, 5)):\n    out = model.output.save()\n"
    with pytest.raises(RuntimeError, match="source code"):
        exec(code, {"model": model, "torch": torch})


def test_outside_trace_plain_forward(seq):
    model = NNsight(seq)
    x = torch.rand(2, 5)
    assert torch.equal(model(x), seq(x))


def test_many_traces_keep_threads_and_memory_flat(seq):
    psutil = pytest.importorskip("psutil")
    model = NNsight(seq)
    x = torch.rand(1, 5)

    def run():
        with model.trace(x):
            out = model[2].output.save()
        return out

    for _ in range(100):
        run()
    threads = threading.active_count()
    rss = psutil.Process().memory_info().rss
    for _ in range(1000):
        run()
    assert threading.active_count() == threads
    assert psutil.Process().memory_info().rss - rss < 20 * 2**20


def test_trace_inside_loop_reuses_call_site(seq):
    model = NNsight(seq)
    results = []
    for i in range(3):
        x = torch.full((1, 5), float(i))
        with model.trace(x):
            out = model.output.save()
        results.append(out)
    assert all(torch.equal(r, seq(torch.full((1, 5), float(i)))) for i, r in enumerate(results))


def test_import_changes_nothing_global():
    import subprocess
    import sys

    code = (
        "import sys, builtins, torch\n"
        "before = (set(vars(torch.Tensor)), set(vars(builtins)), sys.excepthook, sys.gettrace(), set(vars(object)), set(vars(torch.nn.Module)))\n"
        "import nnsight\n"
        "after = (set(vars(torch.Tensor)), set(vars(builtins)), sys.excepthook, sys.gettrace(), set(vars(object)), set(vars(torch.nn.Module)))\n"
        "assert before == after, [a ^ b if isinstance(a, set) else (a, b) for a, b in zip(before, after)]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_trace_restores_tracing_function(seq):
    import sys

    model = NNsight(seq)
    calls = []

    def tracer(frame, event, arg):
        calls.append(event)
        return None

    sys.settrace(tracer)
    try:
        with model.trace(torch.rand(1, 5)):
            out = model.output.save()
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)
    assert out.shape == (1, 2)


def test_container_of_saved_values_is_bound(seq):
    model = NNsight(seq)
    with model.trace(torch.rand(1, 5)):
        outs = [model[i].output.save() for i in range(3)]
        by_name = {"first": outs[0]}
        unsaved = [model[2].output * 2]
    assert len(outs) == 3 and by_name["first"].shape == (1, 10)
    with pytest.raises(UnboundLocalError):
        unsaved  # noqa: B018


def test_nested_trace_of_another_model():
    torch.manual_seed(0)
    a = NNsight(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)))
    b = NNsight(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)))
    x = torch.rand(1, 3)
    with a.trace(x):
        hidden = a[0].output
        with b.trace(hidden):
            inner = b[1].output.save()
        out = a.output.save()
    assert torch.allclose(inner, b._module(a._module[0](x))) and torch.allclose(out, a._module(x))


def test_traces_in_two_threads():
    torch.manual_seed(0)
    models = [NNsight(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))) for _ in range(2)]
    x = torch.rand(1, 3)
    results, errors = {}, []

    def run(i):
        try:
            for _ in range(100):
                with models[i].trace(x):
                    out = models[i][1].output.save()
            results[i] = out
        except BaseException as error:  # reported by the assertion below, with its traceback
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert all(torch.equal(results[i], models[i]._module(x)) for i in range(2))


def test_trace_under_inference_mode(seq):
    model = NNsight(seq)
    x = torch.rand(1, 5)
    with torch.inference_mode():
        with model.trace(x):
            model[0].output[:] = 0
            again = model[0].output.save()
            out = model.output.save()
    assert torch.all(again == 0) and torch.allclose(out, seq[2](seq[1](torch.zeros(1, 10))))


def test_python_dash_c_finds_its_source():
    import subprocess
    import sys

    code = (
        "import torch\nfrom nnsight import NNsight\ntorch.manual_seed(0)\n"
        "net = torch.nn.Sequential(torch.nn.Linear(3, 3))\nm = NNsight(net)\nx = torch.ones(1, 3)\n"
        "with m.trace(x):\n    h = m[0].output.save()\n"
        "print(torch.allclose(h, net(x)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_code_registered_in_linecache_is_traceable(seq):
    import linecache

    model = NNsight(seq)
    text = "with model.trace(x):\n    out = model.output.save()\n"
    filename = "<generated-cell-1>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    scope = {"model": model, "x": torch.rand(1, 5)}
    try:
        exec(compile(text, filename, "exec"), scope)
    finally:
        del linecache.cache[filename]
    assert torch.equal(scope["out"], seq(scope["x"]))


def test_exec_of_another_string_in_a_dash_c_process_is_not_confused():
    import subprocess
    import sys

    code = (
        "import torch\nfrom nnsight import NNsight\nm = NNsight(torch.nn.Linear(2, 2))\n"
        "try:\n    exec('with m.trace(torch.ones(1, 2)):\\n    h = m.output.save()\\n')\n"
        "except Exception as e:\n    print(type(e).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "SourceUnavailableError", done.stderr


def test_identical_code_in_two_files_keeps_each_files_name(seq):
    """Code objects compare by value, not by file: each file's block keeps its own name."""
    import linecache
    import traceback

    model = NNsight(seq)
    text = "with model.trace(x):\n    out = model.output.save()\n    1 / 0\n"
    seen = []
    for name in ("<cell-a>", "<cell-b>"):
        linecache.cache[name] = (len(text), None, text.splitlines(True), name)
        try:
            exec(compile(text, name, "exec"), {"model": model, "x": torch.rand(1, 5)})
        except ZeroDivisionError as error:
            seen.append(traceback.extract_tb(error.__traceback__)[-1].filename)
        finally:
            del linecache.cache[name]
    assert seen == ["<cell-a>", "<cell-b>"]


def test_block_starting_with_try(seq):
    model = NNsight(seq)
    x = torch.rand(1, 5)
    with model.trace(x) as tracer:
        try:
            out = model.output.save()
        except Exception:
            raise
    assert torch.equal(out, seq(x)) and tracer is not None
    with pytest.raises(SyntaxError, match="cannot start with a `try`"):
        with model.trace(x):
            try:
                out = model.output.save()
            finally:
                pass


def test_legacy_scan_and_validate_options_warn_and_change_nothing(seq):
    model = NNsight(seq)
    x = torch.rand(1, 5)
    with pytest.warns(FutureWarning, match="scan=, validate="):
        with model.trace(x, scan=True, validate=True):
            out = model.output.save()
    assert torch.equal(out, seq(x))


def test_saved_values_die_when_the_user_drops_them(seq):
    import gc
    import weakref

    model = NNsight(seq)
    refs = []
    for _ in range(20):
        with model.trace(torch.rand(1, 5)):
            hidden = model[0].output.save()
        refs.append(weakref.ref(hidden))
        del hidden
    gc.collect()
    assert sum(ref() is not None for ref in refs) == 0


def test_compiling_a_block_leaves_the_parse_of_its_file_unchanged():
    """Blocks are rewritten from the cached parse of their file, which other blocks share (a
    session's body holds its traces): compiling one must not change that parse."""
    import ast
    import sys

    from nnsight.tracing.capture import SourceCache

    cache = SourceCache()
    found = []

    class Grab:
        def __enter__(self):
            block = cache.capture(sys._getframe(1))
            before = ast.dump(block.node, include_attributes=True)
            block.compiled()
            found.append((before, ast.dump(block.node, include_attributes=True)))

        def __exit__(self, *exc):
            return False

    def every_rewrite(model, tracer, loss, t):
        with Grab():
            if False:
                hidden = model[0].output.save()
                model[1].output = hidden * 2
                model[1].output[0][:] = 0
                with tracer.iter[1:3] as step:
                    model[0].output.save()
                for step in tracer.all():
                    model[0].input.save()
                with loss.backward():
                    grad = t.grad.save()
                    t.grad = grad * 2

    def invokes(model, tracer):
        with Grab():
            if False:
                with tracer.invoke(1):
                    a = model[0].output.save()
                with tracer.invoke(2):
                    b = (a + model[0].output).save()

    every_rewrite(None, None, None, None)
    invokes(None, None)
    assert len(found) == 2
    for before, after in found:
        assert before == after


def test_caller_variable_bound_only_later_stays_unbound_in_the_block(seq):
    """As in plain Python: reading, updating or deleting a local the caller binds only after
    the block fails, and one the block assigns in a branch it does not take stays unbound."""
    model = NNsight(seq)
    x = torch.rand(1, 5)

    def reads():
        with model.trace(x):
            y = h  # noqa: F841
        h = 0

    def updates():
        with model.trace(x):
            h += 1
        h = 0

    def deletes():
        with model.trace(x):
            del h
        h = 0

    for fn in (reads, updates, deletes):
        with pytest.raises(NameError):
            fn()

    def untaken_branch_in_a_session():
        with model.session():
            with model.trace(x):
                if x.sum() > 1e9:
                    h = model[0].output.save()
                out = model[0].output.save()
            try:
                h  # noqa: B018 (the session sees every name the trace bound)
                state = ["bound"]
            except NameError:
                state = ["unbound"]
            state = list(state).save()
        return state, out

    state, out = untaken_branch_in_a_session()
    assert state == ["unbound"]
    assert torch.equal(out, seq[0](x))


def test_with_headers_over_several_lines_and_bodies_ending_in_dead_code(seq):
    """The block is found from its own lines whatever the header's layout (a header whose call
    is on a later line is found through the file's parse), and its last statements count even
    when they compile to nothing (a false branch, a global)."""
    model = NNsight(seq)
    x = torch.rand(1, 5)
    expected = seq[0](x)

    def split_call():
        with model.trace(
            x
        ):
            first = model[0].output.save()
            if False:
                first = None
        return first

    def parenthesized():
        with (
            model.trace(x)
        ):
            first = model[0].output.save()
        # a comment at the function's level
        return first

    def ends_in_global():
        with model.trace(x):
            global _test_trace_global
            _test_trace_global = model[0].output.save()
        return _test_trace_global

    for fn in (split_call, parenthesized, ends_in_global):
        assert torch.equal(fn(), expected), fn.__name__


def test_as_name_bound_on_a_later_header_line_is_the_tracer(seq):
    """``as tracer`` on the last line of a header that spans lines (black's layout of a long
    call) is bound before the body runs: the header's own lines run as Python wrote them."""
    model = NNsight(seq)
    x = torch.rand(1, 5)
    expected = seq(x)

    def split_call():
        with model.trace(
            x
        ) as tracer:
            result = tracer.result.save()
        return result

    def after_no_grad():
        with torch.no_grad(), model.trace(
            x
        ) as tracer:
            result = tracer.result.save()
        return result

    def one_item_per_line():
        with (
            torch.no_grad(),
            model.trace(x) as tracer,
        ):
            result = tracer.result.save()
        return result

    for fn in (split_call, after_no_grad, one_item_per_line):
        assert torch.equal(fn(), expected), fn.__name__
