"""``DiffusionModel``: a diffusers pipeline behind the nnsight API, one step per denoising step.

    from nnsight import DiffusionModel
    model = DiffusionModel(pipeline)                  # a built DiffusionPipeline, or a repo id / folder
    with model.generate("a red cube", num_inference_steps=4, seed=0) as tracer:
        for step in tracer.iter[2]:                   # the third denoising step
            model.unet.mid_block.output[:] = 0
        image = model.output.images[0].save()         # a PIL image
    with model.generate(num_inference_steps=2, seed=0) as tracer:
        with tracer.invoke("a cat"):                  # several invokes: one batched pipeline call
            cat = model.unet.output.save()
        with tracer.invoke("a dog", seed=5):
            dog = model.unet.output.save()

Options of ``DiffusionModel(...)``:
    pipeline        a ``diffusers.DiffusionPipeline``, or a repo id / local folder to load one from
    automodel       the diffusers class to load with (default ``DiffusionPipeline``)
    dispatch        accepted for 0.8.1 scripts; a pipeline is always loaded at once
    **kwargs        passed to ``from_pretrained`` (torch_dtype, variant, ...)

Options of ``generate(*prompts, **kwargs)`` / ``trace(...)``:
    prompts         a string or a list of strings (one image per string, times num_images_per_prompt)
    seed            the initial noise: row ``j`` of an invoke uses ``seed + j``, so an invoke gets the
                    same images batched as alone; ``tracer.invoke(prompt, seed=...)`` sets one invoke's
    **kwargs        passed to the pipeline (num_inference_steps, guidance_scale, height, width,
                    output_type, num_images_per_prompt, negative_prompt, generator, ...)
    ``trace`` is ``generate`` with ``num_inference_steps=1`` unless given.

Steps: the pipeline runs once, and iteration ``k`` (``tracer.iter[k]``) is each module's
``k``-th call in it: the denoiser's ``k``-th denoising step (for pipelines that call it once
per step), while the decode (``model.vae``) is read as its first call. ``model.output`` (and
``tracer.result``) is the pipeline's output for this invoke's prompts, available anywhere in
the block. Each invoke sees its
own rows of every batched tensor, including both halves of a classifier-free-guidance
batch (unconditional rows first, as the pipeline lays them out).
"""

from __future__ import annotations

import torch

from ..tracing.batching import Rows
from ..tracing.errors import NNsightError
from ..tracing.interleaver import current_mediator
from ..tracing.tracer import Tracer
from .base import NNsight

_INVOKE_OPTIONS = ("seed",)


def import_diffusers():
    """``diffusers``, or an ImportError that says how to get it (it is an optional extra)."""
    try:
        import diffusers
    except ImportError as error:
        raise ImportError("DiffusionModel needs the optional `diffusers` package: pip install 'nnsight[diffusion]'") from error
    return diffusers


class PipelineModule(torch.nn.Module):
    """The pipeline's module components as children (``unet``, ``vae``, ...); forward runs the pipeline."""

    def __init__(self, pipeline):
        super().__init__()
        object.__setattr__(self, "pipeline", pipeline)  # not a Module: kept out of the module tree
        for name, component in pipeline.components.items():
            if isinstance(component, torch.nn.Module):
                self.add_module(name, component)

    def forward(self, *args, **kwargs):
        return self.pipeline(*args, **kwargs)


class DiffusionTracer(Tracer):
    """``with model.generate(...)``: the block runs across the pipeline's denoising loop."""

    def __init__(self, model, args, kwargs, run_kwargs):
        super().__init__(model, args, kwargs, run_kwargs)
        images = run_kwargs.get("num_images_per_prompt") or 1
        if not isinstance(images, int) or images < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, not {images!r}")
        self.images_per_prompt = images
        self.seed = run_kwargs.get("seed")

    @property
    def result(self):
        """Inside the block: the pipeline's output for this invoke (as ``model.output``); after it: all of it."""
        mediator = current_mediator()
        return self._result if mediator is None else _invoke_result(mediator)

    def _run(self, interleaver, args, kwargs):
        model = self.model
        options = {k: v for k, v in self._run_kwargs.items() if k != "seed"}
        call = {**kwargs, **options}
        # One run of the pipeline: iteration k (tracer.iter[k]) is each module's k-th call in it.
        return interleaver.run(lambda: model._run_pipeline(call))


class DiffusionModel(NNsight):
    """A diffusers pipeline behind the nnsight API (see module docstring)."""

    def __init__(self, pipeline, automodel=None, dispatch: bool = True, **kwargs):
        diffusers = import_diffusers()
        if isinstance(pipeline, (str, bytes)) or hasattr(pipeline, "__fspath__"):
            loader = automodel or diffusers.DiffusionPipeline
            if isinstance(loader, str):
                loader = getattr(diffusers, loader)
            pipeline = loader.from_pretrained(str(pipeline), **kwargs)
        elif kwargs:
            raise TypeError(f"DiffusionModel got loading options {sorted(kwargs)} for an already built pipeline")
        if not isinstance(pipeline, diffusers.DiffusionPipeline):
            raise TypeError(f"DiffusionModel wraps a diffusers DiffusionPipeline, not {type(pipeline).__name__}")
        super().__init__(PipelineModule(pipeline))
        object.__setattr__(self, "pipeline", pipeline)

    def generate(self, *prompts, remote: bool = False, blocking: bool = True, **kwargs) -> DiffusionTracer:
        """A context that runs the whole pipeline, the block alongside every denoising step."""
        if remote:
            raise NNsightError("DiffusionModel does not run remotely")
        if "seed" in kwargs and kwargs.get("generator") is not None:
            raise ValueError("pass either seed= or generator=, not both")
        return DiffusionTracer(self, prompts, {}, kwargs)

    def trace(self, *prompts, remote: bool = False, blocking: bool = True, **kwargs) -> DiffusionTracer:
        """``generate`` with one denoising step unless ``num_inference_steps`` is given."""
        kwargs.setdefault("num_inference_steps", 1)
        return self.generate(*prompts, remote=remote, blocking=blocking, **kwargs)

    def scan(self, *inputs, **kwargs):
        raise NNsightError("DiffusionModel has no scan: the pipeline's loop is not fake-tensor safe")

    @property
    def output(self):
        """The pipeline's output object for this invoke's prompts (``.images``), once it has run."""
        mediator = current_mediator()
        if mediator is None:
            raise NNsightError("model.output is only available inside `with model.generate(...)` / `model.trace(...)`")
        return _invoke_result(mediator)

    @output.setter
    def output(self, value):
        raise NNsightError("model.output of a DiffusionModel is the pipeline's result and cannot be replaced")

    # -- inputs ----------------------------------------------------------------

    def _prepare_input(self, *prompts, **options):
        unknown = sorted(set(options) - set(_INVOKE_OPTIONS))
        if unknown:
            raise NNsightError(
                f"tracer.invoke() of a DiffusionModel takes prompts and seed=, not {unknown}: "
                "pass pipeline options to model.generate(...)"
            )
        rows = []
        for value in prompts:
            if isinstance(value, str):
                rows.append(value)
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
                rows.extend(value)
            else:
                raise TypeError(f"a DiffusionModel prompt must be a string or a list of strings, not {value!r}")
        if not rows:
            raise NNsightError("a DiffusionModel invoke needs a prompt")
        return (rows,), options, len(rows)

    def _batch(self, prepared, invokers):
        tracer = invokers[0].tracer
        images = tracer.images_per_prompt
        prompts, seeds = [], []
        for ((rows,), options), invoker in zip(prepared, invokers):
            prompts += rows
            seed = options.get("seed", tracer.seed)
            seeds += [None if seed is None else seed + j for j in range(len(rows) * images)]
        total = len(prompts)
        for invoker in invokers:
            start, size = invoker.rows
            ours = (start * images, size * images)
            segments = {total * images: [ours], 2 * total * images: [ours, (total * images + ours[0], ours[1])]}
            segments.pop(total, None)  # rows of the plain batch are already this invoke's
            invoker.rows = Rows(start, size, segments)
        call = {"prompt": prompts}
        if any(s is not None for s in seeds):
            if any(s is None for s in seeds):
                raise NNsightError("give seed= to every invoke (or to model.generate) or to none of them")
            device = self.pipeline.device
            call["generator"] = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
        return (), call

    # -- running -----------------------------------------------------------------

    def _run_pipeline(self, call):
        return self._module(**call)


def _invoke_result(mediator):
    """The pipeline's output cut to ``mediator``'s prompts: engine-cut tensors, and its share of image lists."""
    result = mediator.wait_for_result()
    if mediator.rows is None:
        return result
    start, size = mediator.rows
    images = mediator.interleaver.tracer.images_per_prompt
    return _rows_of(result, start * images, size * images)


def _rows_of(result, start, size):
    """``result`` with only images ``start:start+size`` (a diffusers BaseOutput, a tuple or a list).
    """
    def cut(value):
        # Tensors were already cut to this invoke's rows by the engine (see DiffusionModel._batch).
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (list, tuple)) or len(getattr(value, "shape", ())) > 0:  # PIL lists, numpy
            return value[start : start + size]
        return value

    if hasattr(result, "__dataclass_fields__"):
        return type(result)(**{k: cut(getattr(result, k)) for k in result.__dataclass_fields__})
    if isinstance(result, tuple):
        return tuple(cut(v) for v in result)
    return cut(result)
