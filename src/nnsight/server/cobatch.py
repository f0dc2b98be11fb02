"""Co-batching: several trace (or generate) requests for one model run as one batched forward (or generate).

    plan = plan_batches(model, jobs, 8)       # [[job, job, ...], [job], ...] in arrival order
    for group in plan:
        for job_id, outcome in run_group(model, group, run_one):
            ...                               # outcome: (values, blob) or the exception of that job

Each request becomes one invoke of a shared trace (or generate), so the engine's row isolation
gives it only its own rows: every module value, ``.inputs``, ``model.output`` and
``tracer.result`` it reads is a view of its rows, at every step, and its edits reach only them. Its
code runs in its own scope (its own names, saved values and prints), and an exception
in its code ends that request's invoke only: the others go on and complete.

Who may share a forward (decided per request, before it runs):
    * a ``trace`` without trace keyword arguments whose inputs are text, and whose
      prompts tokenize to the same padded width as its batch-mates' (so every row is
      computed exactly as it would be alone, with the same shapes);
    * a ``generate`` with text inputs of the same padded width, whose generation settings
      equal its batch-mates' and make every row compute what it would alone
      (``fixed_generation``): greedy (``do_sample`` off, one beam) and only the settings in
      ``GENERATE_SETTINGS``. Sampling draws from one random stream in batch order, so it
      runs alone. An end-of-sequence token may end a request before its batch-mates: its
      invoke then ends at that step (``GroupGenerateTracer``, modeling/invoke_ends.py), as
      its solo run would: its step loops end there, its code sees no later step, and
      ``tracer.result`` is its rows cut to its solo length (rows of it that
      finished earlier carry pad tokens, as they do alone);
    * whose code uses none of the features that act on the whole forward or need
      their own pass: ``tracer.stop()``, ``.invoke``, ``.backward``/``.grad``, ``.skip``,
      ``.edit``, ``.cache``, barriers, ``.source``, ``requires_grad``, and in a ``trace``
      also ``tracer.result`` and step loops (``tracer.iter``/``.all()``/``.next()``); in a
      ``generate`` those loop over this request's own steps, and ``tracer.result`` (like the
      deprecated ``model.generator.output``) is its own rows of the generated ids: allowed.
Everything else runs alone, in turn. A co-batched request that still reaches one of
those at run time (``tracer.stop()``, ``backward``) gets a clear error, never a shared effect.

Time: a co-batch shares one time limit. ``time_limit`` (a SIGALRM timer) raises
``JobTimeout`` in whatever code runs when a request's code overstays, so a request that
loops fails alone and its batch-mates go on; if the model itself is what runs late,
the whole batch fails with that error.
"""

from __future__ import annotations

import ast
import contextlib
import signal

import greenlet

from ..sandbox.errors import SandboxError
from ..sandbox.guards import Guards
from ..tracing.errors import NNsightError
from ..tracing.tracer import Tracer
from ..modeling.language import GenerateTracer

RUN_ALONE_ATTRS = frozenset({
    "stop", "invoke", "backward", "grad", "skip", "edit", "clear_edits", "cache", "barrier", "iter", "all",
    "next", "source", "requires_grad", "requires_grad_", "retain_grad", "register_hook", "session", "generate",
    "trace", "result",
})
# Step loops act on one request's own steps in a generate (each invoke keeps its own step), and its
# tracer.result is its own rows, as model.generator.output is (both read the invoke's share of the result).
PER_REQUEST_ATTRS = frozenset({"iter", "all", "next", "result"})
# Generation settings a co-batched generate may give (JSON scalars, equal across the batch).
GENERATE_SETTINGS = frozenset({"max_new_tokens", "min_new_tokens", "do_sample", "num_beams", "use_cache",
                               "temperature", "top_k", "top_p"})


def uses_whole_forward(request: dict) -> bool:
    """Whether the request's code names any feature that must not share a forward (see module docstring)."""
    refused = RUN_ALONE_ATTRS - PER_REQUEST_ATTRS if request.get("kind") == "generate" else RUN_ALONE_ATTRS
    sources = [request.get("source") or ""] + [fn.get("source") or "" for fn in request.get("functions") or []]
    for text in sources:
        try:
            tree = ast.parse("if True:\n" + text if text[:1].isspace() else text)
        except SyntaxError:
            return True  # the sandbox reports it when the request runs alone
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in refused:
                return True
    return False


def fixed_generation(model, kwargs: dict):
    """``kwargs`` of a generate as a sorted tuple when every row runs as it would alone (see module docstring); else None.

    Greedy, one beam, only ``GENERATE_SETTINGS``: a fixed number of steps, or one that an
    end-of-sequence token ends early (each request's invoke then ends at its own end).
    """
    if not isinstance(kwargs, dict) or not set(kwargs) <= GENERATE_SETTINGS:
        return None
    if not all(value is None or type(value) in (bool, int, float) for value in kwargs.values()):
        return None
    config = getattr(getattr(model, "_module", None), "generation_config", None)
    if config is None:
        return None

    def setting(name):
        return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, None)

    if setting("do_sample") or (setting("num_beams") or 1) != 1:
        return None
    return tuple(sorted(kwargs.items()))


def batch_key(model, request: dict):
    """What batch-mates must share (kind, padded token width, generation settings), or None: run alone."""
    kind = request.get("kind")
    if kind == "trace":
        if request.get("kwargs"):
            return None
        settings = ()
    elif kind == "generate" and hasattr(model, "generate"):
        settings = fixed_generation(model, request.get("kwargs") or {})
        if settings is None:
            return None
    else:
        return None
    if uses_whole_forward(request):
        return None
    inputs = request.get("inputs") or []
    texts = []
    for value in inputs:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            texts.extend(value)
        else:
            return None  # token ids, tensors, dicts: run alone rather than guess their rows
    tokenizer = getattr(model, "tokenizer", None)
    if not texts or tokenizer is None:
        return None
    width = max(len(tokenizer(text, add_special_tokens=True)["input_ids"]) for text in texts)
    return (kind, width, settings)


def plan_batches(model, jobs: list, max_batch: int) -> list:
    """Split ``jobs`` (dicts with ``request``) into groups that may share a forward, keeping arrival order."""
    groups, open_groups = [], {}
    for job in jobs:
        key = batch_key(model, job["request"])
        if key is None:
            groups.append([job])
            continue
        group = open_groups.get(key)
        if group is None or len(group) >= max_batch:
            group = open_groups[key] = []
            groups.append(group)
        group.append(job)
    return groups


class CoBatchGuards(Guards):
    """The sandbox's guards, plus: no ``as_strided`` (a view of a request's rows could reach its batch-mates' rows)."""

    @staticmethod
    def _refuse(name):
        if isinstance(name, str) and "as_strided" in name:
            raise SandboxError(f"{name} is not available in remote code (it can reach memory outside a tensor's view)")

    def getattr(self, obj, name, *default):
        self._refuse(name)
        return super().getattr(obj, name, *default)

    def module_attr(self, name, module, attr):
        self._refuse(attr)
        return super().module_attr(name, module, attr)


_UNSET = object()


class _Group:
    def __init__(self):
        self.main = greenlet.getcurrent()
        self.batched = False
        # One table of saved values for the group: the engine marks a value saved on the
        # trace that runs the forward (the lead). Each request still binds only names of its
        # own scope, which can hold none of its batch-mates' objects.
        self.saved = {}
        self.outer = _UNSET  # the block context running when the group began (None in a worker)
        self.settings = None  # (kind, generation settings) of the first request: all must equal it


class GroupTracer(Tracer):
    """A request's trace in a co-batch: records the block, then waits for the shared forward."""

    def __init__(self, model, inputs, group, run_kwargs=None):
        super().__init__(model, inputs, {}, run_kwargs)
        self.group = group
        self._saved = group.saved
        self.outcome = None  # the exception of this request's own code, if it raised

    def _execute(self, scope):
        # The requests' blocks begin one after another in this thread, so the engine would see
        # each as running inside the previous one (as a trace inside a session). They are
        # independent: each runs inside whatever ran before the group, nothing else.
        group = self.group
        if group.outer is _UNSET:
            group.outer = self.parent
        self.parent = group.outer
        order = group.main.switch(self)
        if order == "alone":
            return super()._execute(scope)
        if self.outcome is not None:
            raise self.outcome
        return None

    def own_invoke(self):
        """This request's single implicit invoke, or None when it wrote explicit invokes (it then runs alone)."""
        invokers = self._invokers
        if len(invokers) == 1 and invokers[0].args is self._args and invokers[0].has_input:
            return invokers[0]
        return None

    def stop(self):
        if self.group.batched:
            raise NNsightError("tracer.stop() is not available in a co-batched request (it would end its batch-mates' pass)")
        return super().stop()

    def backward(self, *args, **kwargs):
        if self.group.batched:
            raise NNsightError("gradients are not available in a co-batched request")
        return super().backward(*args, **kwargs)


class GroupGenerateTracer(GroupTracer, GenerateTracer):
    """A request's generate in a co-batch: its invoke runs across the steps of one shared ``generate``,
    and ends where its solo run would (when all its rows have emitted an end-of-sequence token)."""

    @property
    def invokes_end_alone(self):
        # Only in the shared pass: a request that runs alone keeps the local rule for its own invokes.
        return self.group.batched


class JobTimeout(BaseException):
    """A co-batched request's code ran past the time limit (a BaseException: ``except Exception`` in user code cannot swallow it)."""


@contextlib.contextmanager
def time_limit(seconds, message):
    """Raise ``JobTimeout(message)`` in the running code after ``seconds``, then again every tenth of that."""
    if not seconds or seconds <= 0:
        yield
        return

    def expired(signum, frame):
        raise JobTimeout(message)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds, max(0.05, seconds / 10))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _isolated(body, tracer):
    """The invoke body of one request: its exception ends its own code only."""

    def run():
        try:
            body()
        except (Exception, JobTimeout) as error:  # noqa: BLE001 - reported to that request alone, never to its batch-mates
            tracer.outcome = error

    return run


def run_group(model, jobs: list, run_one, timeout=None, timeout_message="the job ran past the server's time limit"):
    """Run ``jobs`` together; ``run_one(job, make_context)`` runs one request's code. Yields ``(job, outcome)``.

    ``outcome`` is what ``run_one`` returned, or the exception it raised. ``timeout``: seconds
    before a request's running code is stopped with ``JobTimeout`` (None: no limit here).
    """
    group = _Group()
    parked = []  # (job, greenlet, tracer)
    finished = []

    def make_context(kind, inputs, kwargs):
        # The shared pass runs with the lead's settings: every request must have asked for exactly those.
        settings = (kind, tuple(sorted(kwargs.items())))
        if group.settings is None:
            group.settings = settings
        if settings != group.settings or kind not in ("trace", "generate") or (kind == "trace" and kwargs):
            raise NNsightError("internal: a request that cannot be co-batched reached a co-batch")
        if kind == "generate":
            return GroupGenerateTracer(model, inputs, group, dict(kwargs))
        return GroupTracer(model, inputs, group)

    def start(job):
        def body(_first_switch):
            return ("done", run_one(job, make_context))

        return greenlet.greenlet(body)

    def step(job, glet, value):
        """Switch into a request's greenlet: it parks at its forward (a GroupTracer) or finishes."""
        try:
            answer = glet.switch(value)
        except BaseException as error:  # noqa: BLE001 - the request's own failure, reported to it
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            finished.append((job, error))
            return None
        if isinstance(answer, GroupTracer):
            return answer
        finished.append((job, answer[1]))
        return None

    for job in jobs:
        glet = start(job)
        tracer = step(job, glet, None)
        if tracer is None:
            continue
        if tracer.own_invoke() is None:
            with time_limit(timeout, timeout_message):  # its own pass, under the same limit
                step(job, glet, "alone")
        else:
            parked.append((job, glet, tracer))
    yield from finished
    finished.clear()
    if not parked:
        return
    tracers = [tracer for _, _, tracer in parked]
    lead = tracers[0]
    invokers = []
    for tracer in tracers:
        invoker = tracer.own_invoke()
        invoker.body = _isolated(invoker.body, tracer)
        invokers.append(invoker)
    group.batched = len(tracers) > 1
    failure = None
    try:
        lead._invokers = invokers
        with time_limit(timeout, timeout_message):
            Tracer._execute(lead, None)
    except (Exception, JobTimeout) as error:  # noqa: BLE001 - the shared pass itself failed: every request in it is told
        failure = error
    # Last parked, first resumed: each request's block context ends in the reverse order it began,
    # so the engine's per-thread record of the running context unwinds to what it was before.
    for job, glet, tracer in reversed(parked):
        if failure is not None and tracer.outcome is None:
            tracer.outcome = failure
        step(job, glet, "batched")
    yield from finished
