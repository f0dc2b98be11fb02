"""Run invoke bodies alongside a model, handing them the model's real values.

    interleaver = Interleaver(batch_size=3)
    interleaver.add(body_fn, rows=(0, 1))      # one Mediator per invoke
    result = interleaver.run(lambda: model(x))

Each invoke body runs in its own greenlet (a `Mediator`). When the body reads
``envoy.output`` it parks a request on that module's `ModuleHook` and switches
back to the model. A module gets a hook only when a block first asks for it: a
`ModuleSlot` goes in the module instance's ``forward`` slot (``nn.Module.__call__``
keeps its fast path), so modules no block touches cost nothing. When the module
runs, the slot finds the hook of the interleaver running in this thread, which
switches into each waiting mediator in invoke order; the body runs until its
next request and the hook returns the (possibly replaced) value to the model.

The rule for repeated reads (the public nnsight's): within one invoke and one
iteration, every read of a module's ``.output`` / ``.input`` / ``.inputs`` is the
same call, with the edits made so far. Iteration ``i`` (``tracer.iter[i]``) is
generation step ``i`` when the model generates, and the module's call number
``i`` in a single forward otherwise; ``envoy.next()`` moves on to the next call.

Greenlets were chosen over threads by measurement: a switch costs well under a
microsecond where a thread hand-off through locks costs tens of microseconds.
"""

from __future__ import annotations

import threading

import greenlet
import torch

from .batching import merge, narrow
from .errors import AfterRunError, InvokeError, MissedValueError, NNsightError, OutOfOrderError

_MISSING = object()


class EarlyStop(BaseException):
    """Unwinds the model's forward after ``tracer.stop()``."""


class LoopEnd(BaseException):
    """Ends an open-ended ``tracer.iter[...]`` loop whose next iteration the model never reached."""


class _State(threading.local):
    """Per thread: the mediator whose code is running, and the interleaver whose model is running."""

    mediator = None
    interleaver = None


current = _State()


def current_mediator():
    return current.mediator


class _Worker:
    """A greenlet that runs one invoke body, then ends.

    Workers are never reused across traces. A greenlet's C stack sits on top of
    the main stack as it was when the greenlet first ran; a parked greenlet
    resumed later, from another call chain, finds different frames there. Code
    that walks the whole C stack from inside the greenlet then follows stale
    return addresses: every PyTorch C++ error does (``c10::Error`` records a
    backtrace with ``_Unwind_Backtrace``), and that crashed a server worker with
    SIGSEGV on a user's shape error after a few jobs. A fresh greenlet costs ~10 µs.
    """

    __slots__ = ("greenlet", "outbox")

    def __init__(self):
        self.greenlet = greenlet.greenlet(self._loop)
        self.outbox = None

    def _loop(self, job):  # (the name errors.py recognises as the start of an invoke's frames)
        try:
            job.body()
            self.outbox = _FINISHED
        except BaseException as error:  # handed to the model side, which re-raises it
            self.outbox = _Failure(error)
        # Returning ends this greenlet and resumes its parent, the model side. A greenlet left
        # suspended instead would never be collected, nor anything its frames hold (the
        # invoke's saved values: measured as 1,050 tensors kept alive over 1,050 traces).
        greenlet.getcurrent().parent = job.interleaver.main


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error):
        self.error = error


_FINISHED = object()


class Request:
    """A body waits for ``hook``'s call number ``index`` of generation step ``step``, at ``point``."""

    __slots__ = ("hook", "point", "kind", "step", "index")

    def __init__(self, hook, point, kind, step, index):
        self.hook, self.point, self.kind, self.step, self.index = hook, point, kind, step, index

    def describe(self):
        suffix = f" (call {self.index + 1})" if self.index else ""
        step = f" at generation step {self.step}" if self.step else ""
        return f"{self.hook.path}.{self.kind}{suffix}{step}"


class StepRequest:
    """Waits for the model's forward number ``step`` to begin (generation steps)."""

    __slots__ = ("step",)
    hook = None

    def __init__(self, step):
        self.step = step


class ResultRequest:
    """Waits for the value the whole run returns (``tracer.result``; the deprecated ``model.generator.output``)."""

    __slots__ = ()
    hook = None


class BarrierRequest:
    __slots__ = ("barrier",)
    hook = None

    def __init__(self, barrier):
        self.barrier = barrier


class Delivery:
    """A value handed to a mediator while the model is paused at one hook point."""

    __slots__ = ("hook", "point", "step", "index", "full", "view", "skip")

    def __init__(self, hook, point, step, index, full, view):
        self.hook, self.point, self.step, self.index, self.full, self.view = hook, point, step, index, full, view
        self.skip = _MISSING

    def read(self, kind):
        if kind == "input":
            args, kwargs = self.view
            if args:
                return args[0]
            return next(iter(kwargs.values())) if kwargs else None
        return self.view

    def write(self, kind, value, mediator):
        il = mediator.interleaver
        if kind == "input":
            args, kwargs = self.view
            if args:
                new = ((value, *args[1:]), kwargs)
            elif kwargs:
                key = next(iter(kwargs))
                new = (args, {**kwargs, key: value})
            else:
                raise ValueError(f"{self.hook.path} was called without inputs: there is no .input to replace")
        elif kind == "inputs":
            if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict)):
                raise TypeError(f"{self.hook.path}.inputs must be set to an (args_tuple, kwargs_dict) pair")
            new = (tuple(value[0]), value[1])
        else:
            new = value
        if il.scanning:
            _check_shapes(f"{self.hook.path}.{kind}", self.read(kind) if kind != "inputs" else self.view, value)
        self.full = merge(self.full, self.view, new, mediator.rows, il.batch_size)
        self.view = narrow(self.full, mediator.rows, il.batch_size)


def _remember_views(views, view, full):
    """Map each tensor an invoke was handed to the batch tensor it is a view of."""
    if isinstance(view, torch.Tensor):
        if view is not full:
            views[id(view)] = (view, full)
    elif isinstance(view, (tuple, list)) and isinstance(full, (tuple, list)):
        for v, f in zip(view, full):
            if isinstance(v, torch.Tensor) and v is not f:
                views[id(v)] = (v, f)


def _check_shapes(where, old, new):
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
        try:
            fits = torch.broadcast_shapes(tuple(new.shape), tuple(old.shape)) == tuple(old.shape)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"{where}: cannot assign a tensor of shape {tuple(new.shape)} where the model produces "
                f"shape {tuple(old.shape)}"
            )
    elif isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)) and len(old) == len(new):
        for i, (o, n) in enumerate(zip(old, new)):
            _check_shapes(f"{where}[{i}]", o, n)


_slot_lock = threading.Lock()  # installing and removing slots from several threads


class ModuleSlot:
    """Sits in a module's ``forward`` slot while any trace (in any thread) uses the module.

    Calls go to the hook of the interleaver running the model in this thread, or
    straight to the module's own forward. One slot per module, shared by every
    trace that uses it, removed when the last one ends.
    """

    __slots__ = ("module", "original", "previous", "users", "__wrapped__")

    def __init__(self, module):
        self.module = module
        module_dict = module.__dict__
        self.previous = module_dict.get("forward", _MISSING)  # an instance wrapper (accelerate), kept
        self.original = module.forward
        self.__wrapped__ = self.original  # keeps inspect.signature(module.forward) truthful
        self.users = 0
        module_dict["forward"] = self

    def __call__(self, *args, **kwargs):
        il = current.interleaver
        if il is not None:
            hook = il.hooks.get(id(self.module))
            if hook is not None:
                return hook(args, kwargs)
        return self.original(*args, **kwargs)

    @property
    def wraps_instance_forward(self) -> bool:
        """Whether the module instance had its own ``forward`` (a wrapper such as accelerate's)."""
        return self.previous is not _MISSING

    @staticmethod
    def acquire(module) -> "ModuleSlot":
        with _slot_lock:
            slot = module.__dict__.get("forward")
            if type(slot) is not ModuleSlot:
                slot = ModuleSlot(module)
            slot.users += 1
            return slot

    def release(self):
        with _slot_lock:
            self.users -= 1
            if self.users:
                return
            module_dict = self.module.__dict__
            if module_dict.get("forward") is self:
                if self.previous is _MISSING:
                    del module_dict["forward"]
                else:
                    module_dict["forward"] = self.previous


def installed_slots(module: torch.nn.Module) -> int:
    """How many modules under ``module`` carry an nnsight slot now (0 once every trace has ended)."""
    return sum(type(m.__dict__.get("forward")) is ModuleSlot for m in module.modules())


def active_hook(module):
    """The hook of the interleaver running in this thread for ``module``, or None."""
    il = current.interleaver
    return il.hooks.get(id(module)) if il is not None else None


class ModuleHook:
    """One trace's view of one module: its call count and the requests parked on it.

    A hook object lives on each envoy and is reused by every trace that touches
    the module (building one costs more than resetting it).
    """

    __slots__ = (
        "module", "path", "interleaver", "slot", "forward", "step", "count", "waiting", "waiting_input",
        "counts_steps", "call_inputs", "observers", "dotted", "ops",
    )

    def __init__(self, module, path, dotted):
        self.module = module
        self.path = path
        self.dotted = dotted  # "model.transformer.h.0", the cache's key
        self.interleaver = None
        self.slot = None
        self.call_inputs = None
        self.observers = None  # callables(hook, path, args, kwargs, output) after each call (tracer.cache)
        self.ops = None  # operation name -> OperationHook, when the trace uses this module's .source

    def install(self, interleaver, counts_steps=False):
        self.interleaver = interleaver
        self.step = None
        self.count = 0
        self.waiting = 0  # requests parked on this module (any point)
        self.waiting_input = 0  # of which for its input point
        self.counts_steps = counts_steps  # the root of a generation loop: each call is a step
        self.slot = slot = ModuleSlot.acquire(self.module)
        self.forward = slot.original  # what this trace runs (``.source`` swaps in the rewritten forward)

    def remove(self):
        if self.interleaver is None:
            return
        self.slot.release()
        self.interleaver = self.call_inputs = self.forward = self.slot = None
        self.observers = self.ops = None

    def __call__(self, args, kwargs):
        il = self.interleaver
        if il.bypass:
            return self.forward(*args, **kwargs)
        if self.counts_steps:
            il.begin_step()
        step = il.step
        if self.step != step:
            self.step = step
            self.count = 0
        index = self.count
        self.count = index + 1
        if self.waiting_input:
            (args, kwargs), skip = il.serve(self, "input", index, (args, kwargs))
            self.call_inputs = (args, kwargs)
            output = self.forward(*args, **kwargs) if skip is _MISSING else skip
        else:
            self.call_inputs = (args, kwargs)
            output = self.forward(*args, **kwargs)
        if self.waiting:
            output = il.serve(self, "output", index, output)[0]
        if self.observers:
            args, kwargs = self.call_inputs
            for observe in self.observers:
                observe(self, self.dotted, args, kwargs, output)
        return output


class Mediator:
    """One invoke: its body's greenlet, its rows of the batch and its place in the model."""

    # The names scripts written for nnsight 0.8.1 catch these errors by.
    OutOfOrderError = OutOfOrderError
    MissedProviderError = MissedValueError

    def __init__(self, interleaver, body, rows, label):
        self.interleaver = interleaver
        self.body = body
        self.rows = rows
        self.label = label
        self.worker = None
        self.pending = None
        self.current = None  # Delivery the model is paused at for this mediator
        self.step = 0  # the iteration this body's reads refer to (tracer.iter)
        self.offsets = None  # hook -> calls skipped with envoy.next() in this iteration
        self.loop = None  # the tracer.iter loop this body is in (see StepLoop)
        self.last = None  # Request last served, for error messages
        self.done = False
        self.end = None  # the last generation step this invoke runs, when it ends before the batch (end_invoke)
        self.trim = None  # what makes the run's result this invoke's own (end_invoke)
        self.waited_for_result = False  # asked for tracer.result: what it asks for next is out of order
        self.served = 0
        self.views = {}  # id(row view) -> (view, full tensor): gradients of an invoke's rows
        self.writebacks = []  # [delivery, kind, make_value, key, view] for eproperty transforms, see write_back

    # -- worker side -------------------------------------------------------

    def _call_of(self, hook):
        """``(generation step, call index)`` of ``hook`` that this iteration's reads mean."""
        offset = self.offsets.get(hook, 0) if self.offsets else 0
        if self.interleaver.stepping:
            return self.step, offset
        return 0, self.step + offset

    def get(self, envoy, kind):
        """The value of ``envoy.<kind>`` for this invoke (see the module docstring for which call)."""
        if self.writebacks:
            self._flush_writebacks()
        il = self.interleaver
        hook = il.hook_for(envoy)
        step, index = self._call_of(hook)
        point = "output" if kind == "output" else "input"
        delivery = self.current
        if delivery is not None and delivery.hook is hook and delivery.index == index and delivery.step == step:
            if delivery.point == point:
                return delivery.read(kind)
            if point == "input":  # paused at the output: the inputs of the call that just ran
                args_kwargs = narrow(hook.call_inputs, self.rows, self.interleaver.batch_size)
                return Delivery(hook, "input", step, index, args_kwargs, args_kwargs).read(kind)
        return self._wait(hook, point, kind, step, index).read(kind)

    def set(self, envoy, kind, value=_MISSING, make_value=None):
        """Replace ``envoy.<kind>``; ``make_value`` is called once the model has reached that point."""
        if self.writebacks:
            self._flush_writebacks()
        hook = self.interleaver.hook_for(envoy)
        step, index = self._call_of(hook)
        point = "output" if kind == "output" else "input"
        delivery = self.current
        if not (
            delivery is not None and delivery.hook is hook and delivery.point == point
            and delivery.index == index and delivery.step == step
        ):
            delivery = self._wait(hook, point, kind, step, index)
        delivery.write(kind, make_value() if make_value is not None else value, self)

    def next_call(self, envoy):
        """``envoy.next()``: this iteration's later reads of the module mean its next call."""
        hook = self.interleaver.hook_for(envoy)
        if self.offsets is None:
            self.offsets = {}
        self.offsets[hook] = self.offsets.get(hook, 0) + 1

    def get_grad(self, tensor):
        hook = self.interleaver.grad_hook(tensor)
        delivery = self.current
        if delivery is not None and delivery.hook is hook:
            return delivery.view
        return self._wait(hook, "grad", "grad", 0, 0).view

    def set_grad(self, tensor, make_value):
        hook = self.interleaver.grad_hook(tensor)
        delivery = self.current
        if not (delivery is not None and delivery.hook is hook):
            delivery = self._wait(hook, "grad", "grad", 0, 0)
        delivery.write("grad", make_value(), self)

    def write_back(self, envoy, kind, make_value, key, view):
        """Put ``make_value()`` into ``envoy.<kind>`` when the body next reads or writes a
        value or hands control to the model.

        For views an eproperty computed as a copy: the body's in-place edits of the copy
        are in it by then. Until then ``pending_view(key)`` gives the same view back.
        Where the model has already used that value there is nothing to write back into.
        """
        delivery = self.current
        point = "output" if kind == "output" else "input"
        if delivery is not None and delivery.hook is self.interleaver.hook_for(envoy) and delivery.point == point:
            self.writebacks.append((delivery, kind, make_value, key, view))

    def pending_view(self, key):
        """The view a write-back for ``key`` holds at the current position, or None."""
        for delivery, _, _, pending_key, view in self.writebacks:
            if pending_key == key and delivery is self.current:
                return view
        return None

    def _flush_writebacks(self):
        pending, self.writebacks = self.writebacks, []
        for delivery, kind, make_value, _, _ in pending:
            delivery.write(kind, make_value(), self)

    def skip(self, envoy, value):
        hook = self.interleaver.hook_for(envoy)
        step, index = self._call_of(hook)
        delivery = self.current
        if not (delivery is not None and delivery.hook is hook and delivery.point == "input" and delivery.index == index):
            delivery = self._wait(hook, "input", "input", step, index)
        delivery.skip = value

    def _wait(self, hook, point, kind, step, index):
        self.pending = Request(hook, point, kind, step, index)
        hook.waiting += 1
        if point == "input":
            hook.waiting_input += 1
        self.current = None
        return self.interleaver.main.switch()

    def goto_step(self, step):
        """Point this body's later reads at iteration ``step``."""
        if step != self.step:
            self.step = step
            self.current = None
            self.offsets = None

    def wait_for_step(self, step) -> bool:
        """Park until forward number ``step`` begins; False if the model (or this invoke) finished first."""
        il = self.interleaver
        if step <= il.last_step(self):
            return True
        if il.finished:
            return False
        self.pending = StepRequest(step)
        self.current = None
        return self.interleaver.main.switch()

    def wait_for_result(self):
        il = self.interleaver
        self.waited_for_result = True
        if il.finished:
            return il.result_for(self)
        self.pending = ResultRequest()
        self.current = None
        return il.main.switch()

    def park(self, barrier):
        """Wait at a barrier until the interleaver releases every participant."""
        self.pending = BarrierRequest(barrier)
        self.current = None
        return self.interleaver.main.switch()

    # -- model side --------------------------------------------------------

    def resume(self, value):
        """Switch into the body; returns when it asks for something else or finishes."""
        worker = self.worker
        if worker is None:
            worker = self.worker = _Worker()
            value = self
        previous = current.mediator
        current.mediator = self
        try:
            worker.greenlet.switch(value)
        finally:
            current.mediator = previous
        if self.writebacks:
            self._flush_writebacks()
        if worker.outbox is not None:
            self._finished(worker)
        if self.interleaver.stopping:
            raise EarlyStop()

    def throw(self, error):
        """Raise ``error`` in the body where it is parked."""
        worker = self.worker
        previous = current.mediator
        current.mediator = self
        try:
            worker.greenlet.throw(error)
        finally:
            current.mediator = previous
        if worker.outbox is not None:
            self._finished(worker)

    def _finished(self, worker):
        outcome = worker.outbox
        worker.outbox = None
        self.worker = None
        self.done = True
        self.pending = None
        if outcome is not _FINISHED:
            raise outcome.error

    def kill(self):
        """Unwind a body that is still parked (after an error or tracer.stop())."""
        worker = self.worker
        if worker is None:
            return
        try:
            self.throw(greenlet.GreenletExit())
        except BaseException as unwound:  # the body's own cleanup failed; nothing is left to report to
            # Its traceback holds the model's frames and its context the error being raised to
            # the user, whose traceback leads back here: a cycle that would keep the model.
            unwound.__traceback__ = unwound.__context__ = None
        if self.worker is not None:  # the body swallowed the exit and asked for more: drop it
            self.worker = None
            self.done = True


class Interleaver:
    """Runs a computation and the mediators of one trace together."""

    def __init__(self, batch_size=None, module_order=None):
        self.batch_size = batch_size
        self._module_order = module_order  # () -> {display path: position}, for error messages
        self.mediators: list[Mediator] = []
        self.hooks: dict[int, ModuleHook] = {}
        self.step = -1
        self.stepping = False  # generation: iterations are the model's forward passes
        self.bypass = 0
        self.finished = False
        self.stopping = False
        self.result = None
        self.released = []
        self.tracer = None
        self.scanning = False  # shapes only (model.scan): writes are checked against the model's shapes
        self.single = True
        self.main = None

    @property
    def module_order(self):
        return self._module_order() if self._module_order is not None else None

    def add(self, body, rows=None, label="invoke"):
        mediator = Mediator(self, body, rows, label)
        self.mediators.append(mediator)
        self.single = len(self.mediators) == 1  # no cross-invoke ordering to manage
        return mediator

    def grad_hook(self, tensor):
        raise NNsightError("`.grad` is only available inside a `with tensor.backward():` block of a trace")

    def hook_for(self, envoy, counts_steps=False) -> ModuleHook:
        hook = envoy._hook
        if hook is not None and hook.interleaver is self:
            return hook
        key = envoy._key()
        hook = self.hooks.get(key)
        if hook is None:
            if self.finished:
                mediator = current_mediator()
                # After tracer.result nnsight 0.8.1 calls this out of order; AfterRunError is both.
                error = AfterRunError if mediator is not None and mediator.waited_for_result else MissedValueError
                raise error(
                    f"{envoy._display} was requested after the model had finished running; "
                    "values exist only while the model runs"
                )
            # A module's forward that is already running cannot be hooked any more, and
            # the only modules that can be running when a later request comes are
            # ancestors of this one; hooking them now, before any of them starts, keeps
            # every later request for them servable.
            parent = envoy._parent
            while parent is not None and _never_runs(parent._module):
                parent = parent._parent  # a ModuleList / ModuleDict holds modules but is never called
            if parent is not None:
                self.hook_for(parent)
            hook = envoy._hook
            # None yet, in use by another trace, or made for a module the envoy no longer wraps
            # (a lazily loaded model replaces its meta modules with real ones).
            if hook is None or hook.interleaver is not None or hook.module is not envoy._module:
                hook = envoy._new_hook()
                if envoy._hook is None or envoy._hook.interleaver is None:
                    envoy._hook = hook
            hook.install(self, counts_steps)
            self.hooks[key] = hook
        return hook

    # -- serving -----------------------------------------------------------

    def serve(self, hook, point, index, value):
        """Hand ``value`` to every mediator waiting at this hook point, in invoke order."""
        step = self.step
        skip = _MISSING
        skips = None
        for mediator in self.mediators:
            if mediator.end is not None and step > mediator.end:
                continue  # it has ended (end_invoke): it sees nothing of later steps
            request = mediator.pending
            while (
                request is not None
                and request.hook is hook
                and request.point == point
                and request.index == index
                and request.step == step
            ):
                hook.waiting -= 1
                if point == "input":
                    hook.waiting_input -= 1
                mediator.pending = None
                mediator.served += 1
                rows = mediator.rows
                if rows is None:
                    view = value
                else:
                    view = narrow(value, rows, self.batch_size)
                    _remember_views(mediator.views, view, value)
                delivery = Delivery(hook, point, step, index, value, view)
                mediator.current = delivery
                if self.single:
                    mediator.resume(delivery)
                else:
                    self._resume(mediator, delivery)
                if mediator.current is delivery:
                    mediator.current = None
                mediator.last = request
                value = delivery.full
                if delivery.skip is not _MISSING:
                    skips = skips or []
                    skips.append((mediator, delivery.skip))
                request = mediator.pending
        if skips:
            skip = self._combine_skips(hook, skips)
        return value, skip

    def _combine_skips(self, hook, skips):
        for mediator, value in skips:
            if mediator.rows is None:
                return value
        if len(skips) == len(self.mediators):
            from .batching import concatenate

            return concatenate([value for _, value in skips])
        raise NNsightError(
            f"{hook.path}.skip() was used by some invokes but not all: skip it in every invoke "
            "of the batch, or in a prompt-less invoke"
        )

    def begin_step(self):
        """Called as each top-level forward begins (every generation step)."""
        self.step += 1
        step = self.step
        for mediator in self.mediators:
            request = mediator.pending
            if type(request) is StepRequest and request.step == step and mediator.end is None:
                mediator.pending = None
                self._resume(mediator, True)

    def end_invoke(self, mediator, trim=None):
        """End ``mediator``'s run at the current step while the batch goes on.

        From then on it is as if the model had finished for it: no later step begins
        and no later value reaches it (its code goes on only once the run is over, as
        after a solo run), and its result is ``trim(its rows of the result)``.
        """
        if mediator.end is None:
            mediator.end = self.step
            mediator.trim = trim

    def last_step(self, mediator) -> int:
        """The last step ``mediator`` runs: the model's, unless it ended first (end_invoke)."""
        return self.step if mediator.end is None else mediator.end

    def result_for(self, mediator):
        """The run's result as ``mediator`` sees it: its rows, trimmed if it ended early."""
        value = narrow(self.result, mediator.rows, self.batch_size)
        return value if mediator.trim is None else mediator.trim(value)

    # -- running -----------------------------------------------------------

    def run(self, compute, steps_from=None):
        """Start every mediator, run ``compute()``, then settle what is left.

        ``steps_from``: the envoy whose every forward is one step (generation);
        without it the whole computation is step 0.
        """
        self.main = greenlet.getcurrent()
        result = None
        outer = current.interleaver
        try:
            if steps_from is not None:
                self.stepping = True
                self.hook_for(steps_from).counts_steps = True
            for mediator in self.mediators:
                self._resume(mediator, None)
            if steps_from is None:
                self.begin_step()
            current.interleaver = self
            try:
                result = compute()
            finally:
                current.interleaver = outer
        except EarlyStop:
            pass
        finally:
            self.finished = True
            self.remove_hooks()
        self.result = result
        if not self.stopping:
            self._settle()
        return result

    def _resume(self, mediator, value):
        mediator.resume(value)
        while self.released:
            released = self.released.pop(0)
            released.pending = None
            released.resume(None)

    def release(self, mediators):
        """Let every mediator parked at a barrier go on, in invoke order, once the model regains control."""
        self.released.extend(mediators)

    def remove_hooks(self):
        for hook in reversed(list(self.hooks.values())):
            hook.remove()

    def _settle(self):
        """After the model: end open-ended loops, hand out the result, report what was never served."""
        progress = True
        while progress:
            progress = False
            for mediator in self.mediators:
                request = mediator.pending
                if type(request) is StepRequest:
                    mediator.pending = None
                    self._resume(mediator, False)
                    progress = True
                elif type(request) is ResultRequest:
                    mediator.pending = None
                    self._resume(mediator, self.result_for(mediator))
                    progress = True
                elif type(request) is Request and not self.stepping and mediator.loop is not None:
                    if mediator.loop.reached_end(mediator.step):
                        # tracer.iter over the calls of a module: the model made no call number `step`
                        mediator.pending = None
                        mediator.throw(LoopEnd())
                        progress = True
        for mediator in self.mediators:
            if mediator.pending is not None and not mediator.done:
                self._fail(mediator)

    def _fail(self, mediator):
        request = mediator.pending
        mediator.pending = None
        error = self._describe_missed(mediator, request)
        mediator.throw(error)
        # The body caught the error and carried on: it asked for something else.
        if mediator.pending is not None and not mediator.done:
            self._fail(mediator)

    def _describe_missed(self, mediator, request):
        if type(request) is BarrierRequest:
            return InvokeError(  # a ValueError, as 0.8.1 raises
                f"a barrier for {request.barrier.participants} invokes was reached by only "
                f"{len(request.barrier.arrived)} (never by every invoke): check the number it was created with"
            )
        wanted = request.describe()
        last = mediator.last
        if request.point == "grad":
            after = f" after the gradient of the {last.hook.path}" if last is not None else ""
            return OutOfOrderError(
                f"the gradient of the {request.hook.path} was requested{after}, but it was not computed after "
                "that point: either it had already been computed (inside `with loss.backward():` read gradients "
                "in backward order, later layers first) or the loss does not depend on it"
            )
        if last is not None and last.step == request.step and _runs_before(self.module_order, request.hook, last.hook):
            return OutOfOrderError(
                f"{wanted} was requested after {last.describe()}, but {request.hook.path} had already run "
                f"by then. Within one invoke, access modules in the order the model executes them "
                f"(read {request.hook.path} before {last.hook.path}), or use a separate tracer.invoke()."
            )
        ran = request.hook.step is not None and request.hook.step >= request.step and request.step <= self.last_step(mediator)
        if ran:
            return MissedValueError(
                f"{wanted} was requested, but {request.hook.path} ran only {request.hook.count} time(s) in this "
                f"forward pass. Later calls of a module are reached with tracer.iter[...] or envoy.next()."
            )
        return MissedValueError(
            f"{wanted} was requested, but {request.hook.path} did not run"
            + (f" after {last.describe()}" if last is not None else "")
            + " before the model finished. Check that this module is part of the forward pass "
            "for these inputs"
            + (" and that it runs after the previous access." if last is not None else ".")
        )

    def cleanup(self):
        """Unwind every body still suspended (after an error or tracer.stop())."""
        for mediator in self.mediators:
            mediator.kill()
        self.remove_hooks()

    def forget_run(self):
        """Drop this run's links to its mediators and tracer once it is over.

        Mediators point back at the interleaver and the tracer at it, so without this a
        finished trace would be a reference cycle holding the model until the cyclic
        collector ran.
        """
        for mediator in self.mediators:
            # The body's closure holds the user's scope, which may hold objects (a tracer.cache())
            # that point back at this mediator.
            mediator.body = mediator.worker = mediator.pending = mediator.current = mediator.last = None
        self.mediators = []
        self.tracer = None


def _never_runs(module) -> bool:
    """A container without a forward of its own (calling it raises), so it is never running."""
    return type(module).forward is torch.nn.Module.forward and "forward" not in module.__dict__


def _runs_before(order, hook_a, hook_b) -> bool:
    """Whether module A is registered before module B and is not one of B's ancestors."""
    a, b = hook_a.path, hook_b.path
    if b.startswith(a + ".") or b.startswith(a + "["):
        return False
    return order is not None and order.get(a, -1) < order.get(b, -1)
