"""``VLLM``: trace a model served by an in-process vLLM engine.

    from nnsight.modeling.vllm import VLLM
    model = VLLM("smollm2-135m", dtype="float32")      # a repo id / folder / "smollm2-135m"
    with model.trace("The Eiffel Tower is in the city of", temperature=0.0, max_tokens=5) as tracer:
        logits = list().save()
        for step in tracer.iter[:]:
            logits.append(model.logits.output)          # [1, vocab] per generated token
            hidden = model.model.layers[5].output       # vLLM's own module tree

Options of ``VLLM(model, tensor_parallel_size=1, dispatch=True, **engine_kwargs)``:
    model               repo id, local folder, or "smollm2-135m" (the offline demo model)
    tensor_parallel_size must be 1: tracing needs the model's modules in this process
    dispatch            build the engine now (default); False builds it on first use
    **engine_kwargs     passed to ``vllm.LLM`` (dtype, max_model_len, gpu_memory_utilization, ...).
                        Tracing needs ``enforce_eager=True``, ``enable_prefix_caching=False`` and
                        ``async_scheduling=False``; those are the defaults here, and the engine runs
                        in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set for you).

Options of ``model.trace(*prompts, **sampling)`` and ``tracer.invoke(*prompts, **sampling)``:
    prompts      a string, token ids, a list of either, or a vLLM prompt dict; each prompt is one
                 vLLM request
    **sampling   ``vllm.SamplingParams`` fields (temperature, max_tokens, top_p, seed, ...), or
                 ``sampling_params=SamplingParams(...)``. Given to ``trace`` they are defaults for
                 every invoke; an invoke's own values win.

Shapes differ from the Hugging Face path: vLLM flattens every request into one
``[num_tokens, ...]`` batch (prefill and decode tokens mixed, no padding), so an invoke's
``.output`` is ``[its_tokens_this_step, ...]``: all prompt tokens at step 0, one token per
later step. ``model.logits`` (``[requests, vocab]``, the logits the sampler uses) and
``model.samples`` (``[requests, 1]`` sampled token ids) have one row per request.
A decoder layer returns vLLM's ``(mlp_out, residual)`` pair: the residual stream after the
layer is ``out[0] + out[1]`` (vLLM fuses that add into the next layer's norm).

What vLLM cannot do here raises ``NNsightError`` naming the feature and pointing to
``LanguageModel``: gradients, ``model.scan``, remote execution, tensor/pipeline parallelism,
``n > 1`` samples per prompt, speculative decoding.
"""

from __future__ import annotations

import itertools
import os

import torch

from ..tracing.envoy import Envoy
from ..tracing.errors import MissedValueError, NNsightError
from ..tracing.interleaver import Interleaver, Request, StepRequest
from ..tracing.tracer import Tracer
from .base import NNsight

_USE_LANGUAGE_MODEL = "use nnsight.LanguageModel (the Hugging Face backend) for this"
_request_counter = itertools.count()

# Engine settings tracing depends on: (keyword, value we need, why).
_REQUIRED = (
    ("enforce_eager", True, "hooks must see the eager modules (torch.compile / CUDA graphs bypass them)"),
    ("enable_prefix_caching", False, "cached prompt blocks are not recomputed, so their activations never appear"),
    ("async_scheduling", False, "asynchronous scheduling runs a step ahead of finished requests"),
)


def _unsupported(feature: str, why: str = "") -> NNsightError:
    because = f": {why}" if why else ""
    return NNsightError(f"{feature} is not available with the vLLM backend{because}; {_USE_LANGUAGE_MODEL}.")


class _Passthrough(torch.nn.Module):
    """A hook point outside vLLM's module tree (``model.logits``, ``model.samples``)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, value):
        return value

    def extra_repr(self):
        return self.what


class VLLM(NNsight):
    """A vLLM engine behind the nnsight API (see module docstring)."""

    def __init__(self, model, tensor_parallel_size: int = 1, dispatch: bool = True, **engine_kwargs):
        if tensor_parallel_size != 1 or engine_kwargs.get("pipeline_parallel_size", 1) != 1:
            raise NNsightError(
                "VLLM tracing needs tensor_parallel_size=1 and pipeline_parallel_size=1: interventions run in "
                "this process, on modules that tensor/pipeline parallelism would place in worker processes "
                f"(got tensor_parallel_size={tensor_parallel_size}, "
                f"pipeline_parallel_size={engine_kwargs.get('pipeline_parallel_size', 1)}). "
                f"For a model too large for one device, {_USE_LANGUAGE_MODEL} with device_map='auto'."
            )
        for key, needed, why in _REQUIRED:
            if key in engine_kwargs and engine_kwargs[key] is not None and bool(engine_kwargs[key]) != needed:
                raise NNsightError(f"VLLM tracing needs {key}={needed}: {why}")
        if engine_kwargs.get("speculative_config"):
            raise _unsupported("speculative decoding (several tokens per request per step)")
        super().__init__(_Passthrough("vLLM engine not built yet: it is built on first use"))
        object.__setattr__(self, "_name", str(model))
        object.__setattr__(self, "_engine_kwargs", engine_kwargs)
        object.__setattr__(self, "_dispatched", False)
        object.__setattr__(self, "_llm", None)
        object.__setattr__(self, "_runner", None)
        object.__setattr__(self, "_logits_module", _Passthrough("logits: [requests, vocab], what the sampler uses"))
        object.__setattr__(self, "_samples_module", _Passthrough("samples: [requests, 1], sampled token ids"))
        object.__setattr__(self, "logits", Envoy(self._logits_module, "model.logits", self, self))
        object.__setattr__(self, "samples", Envoy(self._samples_module, "model.samples", self, self))
        if dispatch:
            self.dispatch()

    # -- the engine ------------------------------------------------------------

    def dispatch(self):
        """Build the vLLM engine now (normally done by the constructor or the first use)."""
        if self._dispatched:
            return self
        from .language import _resolve

        # In-process engine: the model's modules must live in this process to be hooked.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        kwargs = {key: needed for key, needed, _ in _REQUIRED}
        kwargs.update({k: v for k, v in self._engine_kwargs.items() if v is not None})
        llm = LLM(model=_resolve(self._name), tensor_parallel_size=1, **kwargs)
        runner = _model_runner(llm)
        object.__setattr__(self, "_llm", llm)
        object.__setattr__(self, "_runner", runner)
        object.__setattr__(self, "_module", runner.model)
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_order", None)
        object.__setattr__(self, "_dispatched", True)
        return self

    @property
    def llm(self):
        """The ``vllm.LLM`` itself, for plain use outside traces (``model.llm.generate(...)``)."""
        return self.dispatch()._llm

    @property
    def tokenizer(self):
        return self.llm.get_tokenizer()

    @property
    def config(self):
        return self.dispatch()._module.config if hasattr(self._module, "config") else None

    def __getattr__(self, name):
        if not name.startswith("_") and not object.__getattribute__(self, "_dispatched"):
            self.dispatch()
        return super().__getattr__(name)

    def __repr__(self):
        self.dispatch()
        return f"{self._module!r}\n+ model.logits ({self._logits_module.what})\n+ model.samples ({self._samples_module.what})"

    def _module_order(self):
        if self._order is None:
            order = {envoy._display: i for i, envoy in enumerate(self._subtree())}
            order["model.logits"] = len(order)
            order["model.samples"] = len(order)
            object.__setattr__(self, "_order", order)
        return self._order

    # -- entry points ------------------------------------------------------------

    def trace(self, *prompts, remote: bool = False, **sampling) -> "VLLMTracer":
        """Run vLLM generation for ``prompts`` (and every invoke) with the block alongside each step."""
        if remote:
            raise _unsupported("remote execution")
        self.dispatch()
        return VLLMTracer(self, prompts, {}, sampling)

    generate = trace  # vLLM always generates; both names run the same thing

    def session(self, remote: bool = False, **kwargs):
        """Several traces as one block (runs here: no remote sessions for vLLM)."""
        if remote:
            raise _unsupported("remote execution")
        return super().session()

    def scan(self, *inputs, **kwargs):
        raise _unsupported("model.scan() (shapes without computation)")

    def edit(self, inplace: bool = False):
        raise _unsupported("model.edit() (persistent interventions)")

    def __call__(self, *args, **kwargs):
        raise NNsightError(
            "a VLLM model is run through model.trace(prompt, ...) (or model.llm.generate(...) without tracing), "
            "not called directly"
        )

    # -- inputs --------------------------------------------------------------------

    def _prepare_input(self, *prompts, **sampling):
        requests = []
        for value in prompts:
            requests += _prompts(value)
        if not requests:
            raise NNsightError("a VLLM invoke needs a prompt: text, token ids, or a list of them")
        return (requests,), sampling, len(requests)

    def _batch(self, prepared, invokers):
        requests = []
        for (prompts,), sampling in prepared:
            requests += [(prompt, sampling) for prompt in prompts]
        return (), {"requests": requests}

    def _run(self, args, kwargs):
        raise NNsightError("a VLLM model is run through model.trace(...)")

    # -- running one trace -----------------------------------------------------------

    def _interleave(self, interleaver, requests, defaults):
        from vllm import SamplingParams

        params = [_sampling_params(SamplingParams, defaults, sampling) for _, sampling in requests]
        llm = self._llm
        # How LLM.generate itself renders prompts (a private method of the pinned vLLM): without
        # it, prompts would reach the engine untokenized, so a vLLM that lacks it is refused.
        render = getattr(llm, "_preprocess_cmpl", None)
        if render is None:
            raise NNsightError(
                f"this vLLM ({_vllm_version()}) has no LLM._preprocess_cmpl, which nnsight uses to prepare "
                "prompts as LLM.generate does; use the vLLM version in constraints-vllm.txt"
            )
        prompts = render([prompt for prompt, _ in requests])
        engine = llm.llm_engine
        if engine.has_unfinished_requests():
            raise NNsightError(
                "the vLLM engine still has unfinished requests (started outside this trace); "
                "let them finish before tracing"
            )
        interleaver.adopt(self)
        model, runner = self._module, self._runner
        logits_module, samples_module = self._logits_module, self._samples_module

        def compute_logits(hidden_states, *args, **kwargs):
            interleaver.enter_request_phase()
            logits = model_compute_logits(hidden_states, *args, **kwargs)
            out = logits_module(logits)
            if id(logits_module) in interleaver.hooks or id(model.logits_processor) in interleaver.hooks:
                # The sampler may scale or mask logits in place: what the trace handed out stays as it was.
                out = out.clone()
            return out

        def sample(logits, *args, **kwargs):
            output = runner_sample(logits, *args, **kwargs)
            interleaver.enter_request_phase()
            ids = output.sampled_token_ids
            new = samples_module(ids)
            if new is not ids:
                output.sampled_token_ids = torch.as_tensor(new, dtype=ids.dtype, device=ids.device).reshape(ids.shape)
            return output

        model_compute_logits = model.compute_logits
        runner_sample = runner._sample
        model.__dict__["compute_logits"] = compute_logits
        runner.__dict__["_sample"] = sample

        def generate():
            trace_id = next(_request_counter)
            external, internal, finished = [], [], {}
            try:
                for i, (prompt, param) in enumerate(zip(prompts, params)):
                    name = f"nnsight-{trace_id}-{i}"
                    internal.append(engine.add_request(name, prompt, param))
                    external.append(name)
                interleaver.bind_requests(internal, params)
                while engine.has_unfinished_requests():
                    for output in engine.step():
                        if output.finished:
                            finished[output.request_id] = output
            finally:
                unfinished = [name for name in external if name not in finished]
                if unfinished:  # an error or tracer.stop(): leave the engine idle for the next call
                    engine.abort_request(unfinished)
            return [finished[name] for name in external]

        try:
            return interleaver.run(generate, steps_from=self)
        finally:
            model.__dict__.pop("compute_logits", None)
            runner.__dict__.pop("_sample", None)


class VLLMTracer(Tracer):
    """``with model.trace(...)`` for a VLLM model: every invoke is a vLLM request."""

    def _run(self, interleaver, args, kwargs):
        return self.model._interleave(interleaver, kwargs["requests"], self._run_kwargs)

    def backward(self, tensor, body, *args, **kwargs):
        raise _unsupported("gradients (`with loss.backward():`)", "vLLM runs its model under torch.inference_mode")


_SCATTERED = "scattered"  # an invoke's requests are not side by side, in order, in this forward
_SCATTERED_ERROR = (
    "vLLM reordered the prompts of this invoke in its batch (it moves requests into the places of finished "
    "ones), so they have no common rows at generation step {step}: give each prompt its own "
    "tracer.invoke(...) to read or edit values after some of its prompts have finished"
)


class _StepLayout:
    """Where each request's rows are in one forward of vLLM's flattened batch."""

    __slots__ = ("req_ids", "index", "starts", "num_tokens", "num_reqs")

    def __init__(self, req_ids, query_start_loc, num_tokens):
        self.req_ids = req_ids
        self.index = {rid: i for i, rid in enumerate(req_ids)}
        self.starts = query_start_loc
        self.num_tokens = num_tokens
        self.num_reqs = len(req_ids)

    def rows(self, requests, tokens: bool):
        """``(start, size)`` of these requests (in invoke order), or None if none of them is in this forward."""
        positions = [self.index[r] for r in requests if r in self.index]
        if not positions:
            return None
        first = positions[0]
        if positions != list(range(first, first + len(positions))):
            return _SCATTERED
        if tokens:
            start = self.starts[first]
            return (start, self.starts[first + len(positions)] - start)
        return (first, len(positions))


class VLLMInterleaver(Interleaver):
    """Per-step rows: each invoke's rows move from one vLLM forward to the next.

    ``VLLMTracer`` runs its traces with one of these (``Tracer._interleaver_class``).
    At the start of every forward (``begin_step``) the rows of each invoke's requests are
    read from ``get_forward_context().attn_metadata[...].query_start_loc`` and the runner's
    request order; while logits are computed and sampled (``enter_request_phase``) rows
    are one per request instead of one per token. An invoke whose requests have all
    finished leaves its ``tracer.iter`` loop and is not served again.
    """

    def adopt(self, model):
        self._vllm = model
        # Each invoke's prompts, as (offset, size) in prompt order; None: the whole batch (prompt-less invoke).
        # A single invoke owns its prompts too, so vLLM reordering them is caught (see _StepLayout.rows).
        self._owned = {mediator: None for mediator in self.mediators}
        invokers = self.tracer._invokers if self.tracer is not None else []
        for mediator, invoker in zip(self.mediators[len(self.mediators) - len(invokers) :], invokers):
            self._owned[mediator] = invoker.rows if invoker.has_input else None
        self._requests_of = {}
        self._params = []
        self._layout = None
        self._phase = "token"
        self._absent = ()
        self._scattered = ()
        self._steps_of = {}  # request id -> forwards it took part in
        self._prompt_of = {}  # request id -> its position among the trace's prompts
        self._gone = set()

    def bind_requests(self, internal_ids, params):
        self._params = params
        for mediator, owned in self._owned.items():
            if owned is not None:
                start, size = owned
                self._requests_of[mediator] = internal_ids[start : start + size]
        self._steps_of = {rid: 0 for rid in internal_ids}
        self._prompt_of = dict(zip(internal_ids, range(len(internal_ids))))

    def grad_hook(self, tensor):
        raise _unsupported("`.grad` (gradients)", "vLLM runs its model under torch.inference_mode")

    # -- per-step rows -------------------------------------------------------------

    def _read_layout(self, step):
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            raise NNsightError("internal: the vLLM model ran without a forward context; cannot find request rows")
        context = get_forward_context()
        metadata = context.attn_metadata
        if isinstance(metadata, list):
            raise _unsupported("micro-batching (ubatching)")
        if isinstance(metadata, dict):
            metadata = next(iter(metadata.values()), None)
        if metadata is None or getattr(metadata, "query_start_loc", None) is None:
            raise NNsightError("internal: vLLM's attention metadata has no query_start_loc for this forward")
        starts = metadata.query_start_loc.tolist()
        runner = self._vllm._runner
        req_ids = list(runner.input_batch.req_ids[: len(starts) - 1])
        num_tokens = starts[-1]
        descriptor = getattr(context, "batch_descriptor", None)
        if descriptor is not None and getattr(descriptor, "num_tokens", None):
            num_tokens = max(num_tokens, descriptor.num_tokens)  # padding rows belong to no request
        layout = _StepLayout(req_ids, starts, num_tokens)
        self._check_schedule(layout, step, runner)
        return layout

    def _check_schedule(self, layout, step, runner):
        """Steps count per request only if vLLM runs every request whole and together (no chunking)."""
        steps_of = self._steps_of
        for i, rid in enumerate(layout.req_ids):
            if rid not in steps_of:
                raise NNsightError(
                    "the vLLM batch holds a request that is not part of this trace; trace on an idle engine"
                )
            if rid in self._gone:
                raise NNsightError(
                    f"vLLM preempted request {self._prompt_of[rid]} of this trace and resumed it later, so its "
                    "steps no longer line up with the trace's steps: give the engine more KV cache or trace "
                    "fewer prompts at once"
                )
            size = layout.starts[i + 1] - layout.starts[i]
            state = runner.requests.get(rid)
            prompt = state.prompt_token_ids if state is not None else None
            expected = (len(prompt) if prompt is not None else size) if steps_of[rid] == 0 else 1
            if size != expected:
                raise NNsightError(
                    f"vLLM ran {size} token(s) of request {self._prompt_of[rid]} in forward {step} where a traced "
                    f"step needs {expected} (chunked prefill or speculative decoding): raise max_num_batched_tokens "
                    "above the total prompt length of the trace"
                )
        for rid, count in steps_of.items():
            if rid not in layout.index:
                if count == 0:
                    raise NNsightError(
                        f"vLLM did not schedule request {self._prompt_of[rid]} of this trace in its first forward "
                        "(too many prompts or tokens for one batch): raise max_num_seqs / max_num_batched_tokens "
                        "or trace fewer prompts at once"
                    )
                self._gone.add(rid)
        for rid in layout.req_ids:
            steps_of[rid] += 1

    def begin_step(self):
        step = self.step + 1
        layout = self._layout = self._read_layout(step)
        self._phase = "token"
        self.batch_size = layout.num_tokens
        absent = []
        self._scattered = ()
        for mediator in self.mediators:
            requests = self._requests_of.get(mediator)
            if requests is None:
                mediator.rows = None
                continue
            rows = layout.rows(requests, tokens=True)
            if rows is None:
                absent.append(mediator)
            elif rows is _SCATTERED:
                self._scattered = (*self._scattered, mediator)
            else:
                mediator.rows = rows
        self._absent = absent
        for mediator in absent:  # its requests have finished: its step loops end here
            if type(mediator.pending) is StepRequest:
                mediator.pending = None
                self._resume(mediator, False)
        super().begin_step()

    def enter_request_phase(self):
        """From here to the end of the step, values have one row per request (logits, samples)."""
        if self._phase == "request":
            return
        self._phase = "request"
        layout = self._layout
        self.batch_size = layout.num_reqs
        for mediator in self.mediators:
            requests = self._requests_of.get(mediator)
            if requests is not None:
                rows = layout.rows(requests, tokens=False)
                if rows is not None and rows is not _SCATTERED:
                    mediator.rows = rows

    def serve(self, hook, point, index, value):
        absent = self._absent
        if not absent and not self._scattered:
            return super().serve(hook, point, index, value)
        for mediator in self._scattered:  # only an invoke that reads or writes now needs its rows
            request = mediator.pending
            if request is not None and request.hook is hook and request.point == point and request.step == self.step:
                raise NNsightError(_SCATTERED_ERROR.format(step=self.step))
        hidden = []
        for mediator in absent:  # finished requests have no rows in this forward
            request = mediator.pending
            if request is not None and request.hook is hook:
                hidden.append((mediator, request))
                mediator.pending = None
        try:
            return super().serve(hook, point, index, value)
        finally:
            for mediator, request in hidden:
                mediator.pending = request

    def _describe_missed(self, mediator, request):
        requests = self._requests_of.get(mediator)
        if type(request) is Request and requests:
            ran = max(self._steps_of.get(rid, 0) for rid in requests)
            if request.step >= ran:
                limits = sorted({p.max_tokens for p in self._params_of(requests)})
                return MissedValueError(
                    f"{request.describe()} was requested, but this invoke's vLLM request finished after {ran} "
                    f"step(s) (max_tokens={limits[0] if len(limits) == 1 else limits}, or a stop token): "
                    f"only steps 0 to {ran - 1} exist for it"
                )
        return super()._describe_missed(mediator, request)

    def _params_of(self, requests):
        return [self._params[self._prompt_of[rid]] for rid in requests]


# -- helpers -----------------------------------------------------------------------


def _model_runner(llm):
    """The model runner of an in-process engine (``LLM.llm_engine.model_executor...``)."""
    executor = getattr(llm.llm_engine, "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    worker = getattr(worker, "worker", worker)  # WorkerWrapperBase -> the platform's worker
    runner = getattr(worker, "model_runner", None)
    if runner is None or not isinstance(getattr(runner, "model", None), torch.nn.Module):
        raise NNsightError(
            "cannot reach the vLLM model in this process: the engine runs its model in another process. "
            "Set VLLM_ENABLE_V1_MULTIPROCESSING=0 before vLLM is first imported, and use one device "
            "(tensor_parallel_size=1)"
        )
    return runner


def _prompts(value):
    """One invoke's input as a list of vLLM prompts (one request each)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        if "prompt" in value or "prompt_token_ids" in value:
            return [value]
        if "input_ids" in value:
            return _prompts(value["input_ids"])
        raise TypeError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(value, torch.Tensor):
        value = value.tolist()
        if isinstance(value, int):
            value = [value]
    if isinstance(value, (list, tuple)):
        if not value:
            raise NNsightError("an empty list is not a valid VLLM prompt")
        if all(isinstance(v, int) for v in value):
            return [{"prompt_token_ids": [int(v) for v in value]}]
        prompts = []
        for v in value:
            prompts += _prompts(v)
        return prompts
    raise TypeError(f"cannot use a {type(value).__name__} as a VLLM prompt (text, token ids, or a list of them)")


def _sampling_params(cls, defaults, own):
    merged = {**defaults, **own}
    given = merged.pop("sampling_params", None)
    if given is not None:
        params = given.clone() if hasattr(given, "clone") else given
        for key, value in merged.items():
            setattr(params, key, value)
    else:
        try:
            params = cls(**merged)
        except TypeError as error:
            raise TypeError(
                f"{error}. VLLM trace/invoke keyword arguments are vllm.SamplingParams fields "
                "(temperature, max_tokens, top_p, top_k, seed, stop, ...)"
            ) from None
    if getattr(params, "n", 1) != 1:
        raise _unsupported(f"n={params.n} samples per prompt", "write one invoke per sample instead")
    return params


VLLMTracer._interleaver_class = VLLMInterleaver

__all__ = ["VLLM", "VLLMTracer", "VLLMInterleaver"]


def _vllm_version() -> str:
    import vllm

    return f"vllm {getattr(vllm, '__version__', '?')}"
