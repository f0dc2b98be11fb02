"""The ``with model.trace(...)`` context: capture the block, run it with the model, bind saved names.

    with model.trace("Hello") as tracer:            # one implicit invoke
        hs = model.transformer.h[0].output.save()

    with model.trace() as tracer:                   # explicit invokes, one batched forward
        with tracer.invoke("Hello"):
            a = model.lm_head.output.save()
        with tracer.invoke(["World", "Test"]):
            b = model.lm_head.output.save()

Tracer methods usable inside the block:
    tracer.invoke(*inputs, **kwargs)   one more batch entry with its own code
    tracer.stop()                      end the forward pass here; saved values are kept
    tracer.barrier(n)                  a rendezvous for n invokes (``barrier()`` in each)
    tracer.iter[...] / tracer.all()    loop over generation steps
    tracer.next()                      move this invoke's code to the next step
    tracer.result                      the value the whole run returns
"""

from __future__ import annotations

import os
import sys
import weakref
import threading
import warnings

import torch

from .capture import SkipBlock, bind, capture, read_scope
from .deprecation import warn_deprecated_at
from .errors import InvokeError, NNsightDeprecationWarning, NNsightError, SaveOutsideTraceError, user_traceback
from .helper_invoke import BLOCK_FUNCTION, HelperInvoke
from .interleaver import Interleaver, LoopEnd, ResultRequest, StepRequest, current_mediator

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Running(threading.local):
    """The innermost block context whose code is executing in this thread (each links to its parent)."""

    context = None


_running = _Running()


def user_frame(depth: int = 2):
    """The first frame outside the nnsight package, ``depth`` frames up from the caller."""
    frame = sys._getframe(depth)
    while frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back  # a subclass's own __enter__ calling ours
    return frame


class Invoker:
    """One ``with tracer.invoke(...)`` block: an input for the batch and the code that goes with it.

    Written in the trace block, the block's compiler hands it its body (``set_body``); written
    in a helper function the block calls, it captures its own body (see helper_invoke).
    """

    def __init__(self, tracer, args, kwargs, where=None):
        self.tracer = tracer
        self.args = args
        self.kwargs = kwargs
        self.has_input = bool(args or kwargs)
        self.body = None
        self.where = where  # (filename, line) of the user's `tracer.invoke(...)`
        self._helper = None

    def __enter__(self):
        if current_mediator() is not None:
            # Invoke code runs while the model runs: too late to add rows to its batch.
            raise InvokeError(
                f"{_at(self.where)}an invoke cannot be opened inside another invoke (its code runs while the "
                "model is already running): write the invokes one after another in the trace block"
            )
        frame = user_frame()
        if frame.f_code.co_name != BLOCK_FUNCTION:
            if _running.context is not self.tracer:
                raise InvokeError(
                    f"{_at(self.where)}tracer.invoke(...) can only be used while its `with model.trace(...)` "
                    "block runs (directly in it, or in a function the block calls)"
                )
            self._helper = HelperInvoke(self, frame, self.tracer._save, _assign)
        return self

    def set_body(self, body):
        self.body = body

    def __exit__(self, exc_type, exc, tb):
        helper, self._helper = self._helper, None
        if helper is not None:
            if not helper.finish(exc_type):
                return False
            self.tracer._invokers.append(self)
            return True  # the body was skipped: ours to run
        if exc_type is None:
            self.tracer._invokers.append(self)
        return False


def _at(where) -> str:
    return f"{where[0]}:{where[1]}: " if where else ""


class StepLoop:
    """``tracer.iter[...]``: iterate an invoke's code over generation steps."""

    def __init__(self, selection):
        self.selection = selection

    def _steps(self):
        sel = self.selection
        if isinstance(sel, int):
            return [sel], False
        if isinstance(sel, slice):
            start, stop, stride = sel.start or 0, sel.stop, sel.step or 1
            if start < 0 or (stop is not None and stop < 0):
                raise ValueError("tracer.iter[...] takes non-negative generation steps")
            if stop is None:
                return _count(start, stride), True
            return list(range(start, stop, stride)), False
        if isinstance(sel, (list, tuple)):
            return list(sel), False
        raise TypeError(f"tracer.iter[...] takes an int, a slice or a list of steps, not {type(sel).__name__}")

    def __iter__(self):
        mediator = current_mediator()
        if mediator is None:
            raise NNsightError("tracer.iter[...] can only be used inside a trace or generate block")
        steps, open_ended = self._steps()
        if mediator.interleaver.stepping:
            return self._generation_steps(mediator, steps, open_ended)
        return self._calls(mediator, steps, open_ended)

    def _generation_steps(self, mediator, steps, open_ended):
        last = None
        remaining = list(steps) if not open_ended else None
        try:
            for step in steps:
                if not mediator.wait_for_step(step):
                    if not open_ended:
                        _warn_unreached(remaining, mediator.interleaver.last_step(mediator) + 1, "generation step(s)")
                    break
                mediator.goto_step(step)
                last = step
                if remaining is not None:
                    remaining.pop(0)
                yield step
        finally:
            if last is not None:
                mediator.goto_step(last + 1)

    def _calls(self, mediator, steps, open_ended):
        """In a single forward, iteration ``i`` is each module's call number ``i``."""
        outer, before = mediator.loop, mediator.step
        state = mediator.loop = _CallLoop(open_ended, steps)
        try:
            for step in steps:
                if state.first is None:
                    state.first = step
                mediator.goto_step(step)
                yield step
                if state.remaining is not None:
                    state.remaining.pop(0)
        finally:
            # After the loop, reads mean the calls they meant before it (the public nnsight's rule).
            mediator.loop = outer
            mediator.goto_step(before)

    def __enter__(self):
        raise NNsightError(
            "`with tracer.iter[...]:` works directly inside a trace block; in a helper function "
            "write `for step in tracer.iter[...]:` instead"
        )

    def __exit__(self, *exc):
        return False


class _CallLoop:
    """A ``tracer.iter`` loop over the calls of modules in one forward (see StepLoop._calls)."""

    __slots__ = ("first", "open_ended", "remaining")

    def __init__(self, open_ended, steps):
        self.first = None
        self.open_ended = open_ended
        self.remaining = None if open_ended else list(steps)

    def reached_end(self, step) -> bool:
        """The model finished while the loop's body waited in iteration ``step``: end the loop there?"""
        if self.first is None or step <= self.first:
            return False  # not even the first iteration was served: that is a missed value
        if not self.open_ended:
            _warn_unreached(self.remaining, step, "module call(s)")
        return True



def _warn_unreached(remaining, ran, what):
    warnings.warn(
        f"tracer.iter: {what} {remaining} never ran (the model ran {ran} {what}), "
        "so the loop's code for them was never reached",
        stacklevel=3,
    )


def _count(start, stride):
    step = start
    while True:
        yield step
        step += stride


class StepIndexer:
    def __getitem__(self, selection):
        return StepLoop(selection)


class BlockContext:
    """A ``with`` block whose body nnsight runs itself: capture, skip, run, bind saved names.

    Subclasses say what running means (``_execute``) and what an implicit invoke is.
    """

    LoopEnd = LoopEnd  # compiled ``tracer.iter`` loops end on it (see capture._ending_loop)

    _enter_returns_self = True

    def __init__(self):
        self._saved: dict[int, object] = {}
        self._published: dict[str, object] = {}
        self._frame = None
        self.parent = None  # the block context this one runs inside (a session), while it runs

    def __enter__(self):
        frame = user_frame()
        self._block = capture(frame)
        self._frame = frame
        self._skipper = self._block.skip(frame)
        return self._entered()

    def _entered(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # The skipper holds the caller's frame, which holds this context: drop it here so
        # that a finished block leaves no reference cycle (see tests/test_memory_release.py).
        skipper, self._skipper = self._skipper, None
        if skipper is not None:
            skipper.restore()
        frame, self._frame = self._frame, None
        if not self._block.skipped(exc_type):
            return False
        try:
            values = self._run_block(frame)
        except BaseException as error:
            if isinstance(error.__context__, SkipBlock):
                error.__suppress_context__ = True
            raise error.with_traceback(user_traceback(error.__traceback__))
        bind(frame, values)
        return True

    def _run_block(self, frame) -> dict:
        """Run the captured body; returns the names to bind in the caller's scope.

        The local engine compiles the body and runs it with the model; the remote
        client overrides this to send the body as a job.
        """
        self.parent = _running.context
        _running.context = self
        try:
            scope = self._block.compiled().run(frame, self, self._save, _assign)
            self._execute(scope)
        finally:
            _running.context = self.parent
        values = read_scope(scope)
        # Published names include the tracer and the model (``__nnsight_rt__``, ``model``): hand
        # them over and forget them, or the tracer would hold its own scope in a cycle.
        published, self._published = self._published, {}
        values.update(published)
        if self.parent is not None:
            # Inside a session every name stays visible to the code after this block, as if
            # the session were one block; the session itself binds only what was saved.
            return values
        return {name: value for name, value in values.items() if self._keeps(value)}

    def _execute(self, scope):
        raise NotImplementedError

    def implicit_invoke(self, body):
        raise NotImplementedError

    def block_form_steps(self, steps):
        """The steps of a ``with tracer.iter[...]:`` block (compiled as a ``for`` loop over them), with
        the deprecation warning of that older form, at the ``with`` line."""
        warn_deprecated_at(
            "The `with tracer.iter[...]:` / `with tracer.all():` block form", "`for step in tracer.iter[...]:`", sys._getframe(1)
        )
        return steps

    def publish(self, names):
        """An explicit invoke's own names, as it ends (see capture._InvokeRewriter)."""
        self._published.update(names)

    def publish_saved(self, names):
        """``publish`` the saved ones of ``names`` (a helper invoke's scope, see helper_invoke)."""
        self._published.update({name: value for name, value in names.items() if self._keeps(value)})

    def _keeps(self, value):
        """Saved, or a list/tuple/dict of saved values (``outs = [m.output.save() for m in layers]``)."""
        saved = self._saved
        if id(value) in saved:
            return True
        if type(value) in (list, tuple):
            return bool(value) and any(id(v) in saved for v in value)
        if type(value) is dict:
            return bool(value) and any(id(v) in saved for v in value.values())
        return False

    # -- gradients (compiled from `with loss.backward():` blocks) ------------

    def backward(self, tensor, body, *args, **kwargs):
        from .backward import run_backward

        run_backward(tensor, body, args, kwargs)

    def grad(self, tensor):
        mediator = current_mediator()
        if mediator is None:
            return tensor.grad
        return mediator.get_grad(tensor)

    def set_grad(self, tensor, make_value):
        mediator = current_mediator()
        if mediator is None:
            tensor.grad = make_value()
        else:
            mediator.set_grad(tensor, make_value)

    def _save(self, value, *args, **kwargs):
        if type(value) is not torch.Tensor and (args or kwargs or hasattr(type(value), "save")):
            return value.save(*args, **kwargs)
        _mark_saved(value, self)
        return value


class Tracer(BlockContext):
    """Runs one ``with`` block together with one run of the model (see module docstring)."""

    _interleaver_class = Interleaver  # a backend with its own batching (vLLM) brings its own

    # Options of older nnsight versions that asked for extra shape checks; they have no effect here.
    _LEGACY_OPTIONS = ("scan", "validate")

    def __init__(self, model, args, kwargs, run_kwargs=None):
        super().__init__()
        self._model_ref = weakref.ref(model)
        self._args = args
        self._kwargs = _without_legacy(kwargs)
        self._run_kwargs = _without_legacy(run_kwargs or {})
        self._invokers: list[Invoker] = []
        self.interleaver = None
        self._result = None
        self._setting_up = False  # running the eager code of a block with no input (implicit_invoke)

    @property
    def model(self):
        """The model this trace runs (``None`` once the user has dropped it).

        Weak, so that ``with model.trace(x) as tracer:`` leaving ``tracer`` bound does not
        keep the model's weights alive after the user drops the model.
        """
        return self._model_ref()

    def implicit_invoke(self, body):
        if not (self._args or self._kwargs):
            # No input: the block is setup code (it may call helpers that open invokes), so it
            # runs now; module values read here have no rows to come from.
            self._setting_up = True
            try:
                body()
            finally:
                self._setting_up = False
            return
        invoker = Invoker(self, self._args, self._kwargs)
        invoker.body = body
        self._invokers.append(invoker)

    # -- the user's API ------------------------------------------------------

    def invoke(self, *args, **kwargs) -> Invoker:
        frame = user_frame()
        return Invoker(self, args, kwargs, (frame.f_code.co_filename, frame.f_lineno))

    def stop(self):
        """End the model's forward pass here; values saved so far are kept."""
        mediator = current_mediator()
        if mediator is None:
            raise NNsightError("tracer.stop() must be called inside the trace's code")
        interleaver = mediator.interleaver
        if interleaver.finished:
            return
        interleaver.stopping = True
        interleaver.main.switch()

    def log(self, *values):
        """Print from inside the trace (kept for scripts written for older nnsight; print works too)."""
        print(*values)

    def barrier(self, participants: int):
        return Barrier(participants)

    @property
    def iter(self):
        return StepIndexer()

    def all(self):
        return StepLoop(slice(None))

    def next(self, steps: int = 1):
        mediator = current_mediator()
        if mediator is None:
            raise NNsightError("tracer.next() must be called inside the trace's code")
        mediator.goto_step(mediator.step + steps)

    def cache(self, modules=None, include_inputs=False, include_output=True, detach=True, device="cpu", dtype=None,
              non_blocking=True):
        """Record module values during this trace: ``cache['model.transformer.h.0'].output``.

        Options (see tracing/cache.py): modules, include_inputs, include_output, detach, device, dtype, non_blocking.
        """
        from .cache import Cache

        mediator = current_mediator()
        if mediator is None:
            raise NNsightError("tracer.cache() must be called inside the trace's code")
        cache = Cache(self.model, mediator, modules, include_inputs, include_output, detach, device, dtype, non_blocking)
        _mark_saved(cache)
        return cache

    @property
    def result(self):
        mediator = current_mediator()
        if mediator is None:
            return self._result
        return mediator.wait_for_result()

    def _where(self):
        block = getattr(self, "_block", None)
        return (block.filename, block.lineno) if block is not None else None

    # -- running ---------------------------------------------------------------

    def run_untraced(self):
        """``model.trace(x, trace=False)``: run the model on this trace's inputs with no block, and
        return what it returns. The model's persistent edits (``model.edit(inplace=True)``) apply,
        as in nnsight 0.8.1; a plain ``model(x)`` leaves them out."""
        self._execute(None)
        result, self._result = self._result, None
        return result

    def _execute(self, scope):
        model = self.model
        invokers = self._invokers
        if self._args or self._kwargs:
            if not any(inv.args is self._args for inv in invokers):
                implicit = Invoker(self, self._args, self._kwargs)
                implicit.body = _nothing
                invokers.insert(0, implicit)
        with_input = [inv for inv in invokers if inv.has_input]
        if not with_input:
            empty = next((inv for inv in invokers if inv.where), None)
            raise InvokeError(
                f"{_at(empty.where if empty else self._where())}nothing to run: model.trace() got no input"
                + (" and its invokes have none either" if invokers else " and has no invokes")
                + ": pass an input to model.trace(...) or add a `with tracer.invoke(input):` block"
            )
        prepared = []
        offset = 0
        for inv in with_input:
            args, kwargs, size = model._prepare_input(*inv.args, **inv.kwargs)
            prepared.append((args, kwargs))
            inv.rows = (offset, size)
            offset += size
        args, kwargs = model._batch(prepared, with_input)
        interleaver = self._interleaver_class(offset, model._module_order)
        interleaver.tracer = self
        single = len(with_input) == 1
        for edit in model._edits:  # persistent edits run first, over the whole batch
            interleaver.add(edit, None)
        for inv in invokers:
            interleaver.add(inv.body, None if (single or not inv.has_input) else inv.rows)
        self.interleaver = interleaver
        try:
            self._result = self._run(interleaver, args, kwargs)
        finally:
            interleaver.cleanup()
            interleaver.forget_run()
            self.interleaver = None
            self._invokers = []  # each points back at this tracer

    def _run(self, interleaver, args, kwargs):
        if self._run_kwargs:
            kwargs = {**kwargs, **self._run_kwargs}
        return interleaver.run(lambda: self.model._run(args, kwargs))


def _without_legacy(kwargs: dict) -> dict:
    """``kwargs`` less ``scan=``/``validate=``, with a warning (once per call site) that they do nothing."""
    legacy = [k for k in Tracer._LEGACY_OPTIONS if k in kwargs]
    if not legacy:
        return kwargs
    warnings.warn(
        f"trace option(s) {', '.join(f'{k}=' for k in legacy)} of older nnsight versions have no effect here: "
        "use `with model.scan(...):` for a shapes-only run (errors already name the module and shapes)",
        NNsightDeprecationWarning,
        stacklevel=4,
    )
    return {k: v for k, v in kwargs.items() if k not in Tracer._LEGACY_OPTIONS}


class Barrier:
    """``barrier = tracer.barrier(2)``; calling ``barrier()`` in two invokes lines them up."""

    def __init__(self, participants):
        self.participants = participants
        self.arrived = []

    def __call__(self):
        mediator = current_mediator()
        if mediator is None:
            raise NNsightError("a barrier must be called inside an invoke's code")
        self.arrived.append(mediator)
        interleaver = mediator.interleaver
        if len(self.arrived) >= self.participants:
            interleaver.release(sorted(self.arrived, key=interleaver.mediators.index))
            self.arrived = []
        mediator.park(self)


def setup_error(what: str):
    """The error for ``what`` (a module value) read by a trace's code that has no input to run on,
    or None where that is not the case (the caller then raises its own NotInTraceError)."""
    tracer = _running.context
    if current_mediator() is not None or not getattr(tracer, "_setting_up", False):
        return None
    return InvokeError(
        f"{_at(tracer._where())}{what} was read in a `with model.trace():` block with no input: module "
        "values come from the rows of an input, so pass one to model.trace(...) or read it inside a "
        "`with tracer.invoke(input):` block"
    )


def _nothing():
    pass


def _assign(target, name, make_value):
    """``target.<name> = make_value()``, reaching the model position first for envoy values."""
    setter = getattr(target, "_assign_lazily", None)
    if setter is not None:
        setter(name, make_value)
    else:
        setattr(target, name, make_value())


def _mark_saved(value, context=None):
    # Every enclosing block binds it: a trace inside a session saves for the session too.
    if context is None:
        mediator = current_mediator()
        context = mediator.interleaver.tracer if mediator is not None and mediator.interleaver.tracer else _running.context
    while context is not None:
        context._saved[id(value)] = value
        context = context.parent


def save(value):
    """``nnsight.save(value)``: the function form of ``value.save()``.

    Outside any trace or session there is nothing to return the value from, so it raises
    (a ``ValueError``, as in nnsight 0.8.1) rather than doing nothing.
    """
    if current_mediator() is None and _running.context is None:
        raise SaveOutsideTraceError(
            "nnsight.save() was called outside a trace: it marks a value to keep after the "
            "enclosing `with model.trace(...):` (or session) block, so call it inside one"
        )
    _mark_saved(value)
    return value


__all__ = ["Tracer", "Invoker", "Barrier", "StepLoop", "save", "StepRequest", "ResultRequest"]
