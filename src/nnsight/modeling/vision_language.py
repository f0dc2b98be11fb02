"""``VisionLanguageModel``: image-text-to-text models (LLaVA, Qwen2-VL, ...) behind the nnsight API.

    from nnsight import VisionLanguageModel
    model = VisionLanguageModel(hf_model, processor=processor)   # or a repo id / local folder
    with model.trace("<image> What is this?", images=[img]):
        patches = model.vision_tower.output.save()
        model.language_model.layers[0].output[:, 0] = 0
        logits = model.lm_head.output.save()
    with model.generate("<image> Describe", images=[img], max_new_tokens=5) as tracer:
        tokens = tracer.result.save()
    with model.trace() as tracer:                 # one batched forward; each invoke its own rows
        with tracer.invoke("<image> A", images=[img_a]):
            a = model.multi_modal_projector.output.save()
        with tracer.invoke("<image> B", images=[img_b]):
            b = model.language_model.layers[1].output.save()

Options of ``VisionLanguageModel(...)`` (and everything ``LanguageModel`` takes):
    model           a built model, or a repo id / folder (loaded with ``AutoModelForImageTextToText``)
    processor       the processor that turns text and images into model inputs (default: loaded
                    beside the model); its tokenizer is ``model.tokenizer``

Inputs of ``trace`` / ``generate`` / ``tracer.invoke``:
    prompts         a string or a list of strings, or a processor's output (a dict with input_ids)
    images=         PIL images (or arrays) for the prompts, in order: each prompt takes as many
                    as it has image tokens (``processor.image_token``)
    text=           the prompt, by keyword (0.8.1's ``generate(text=..., images=...)``)

Names: ``model.vision_tower``, ``model.multi_modal_projector`` and ``model.language_model``
reach those modules wherever the architecture keeps them (``model.model.vision_tower`` in
LLaVA; Qwen2-VL's ``model.model.visual``, its ``visual.merger`` as the projector).

Rows: each invoke sees its own rows of the language model (image tokens included) and its
own images in the vision tower: tensors whose first dimension counts images, image patches
or image tokens are cut to this invoke's part.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..tracing.batching import Rows
from ..tracing.errors import NNsightError
from .language import LanguageModel

# Where architectures keep the parts every vision-language model has, first match wins.
_ALIASES = {
    "vision_tower": ("vision_tower", "visual", "vision_model"),
    "multi_modal_projector": ("multi_modal_projector", "visual.merger", "mm_projector", "connector"),
    "language_model": ("language_model", "text_model"),
}
_CONTAINERS = ("", "model.")


class VisionInput:
    """One invoke's prompts and images, as ``trace(prompt, images=...)`` hands them on."""

    def __init__(self, prompts, images):
        self.prompts = prompts
        self.images = images


class VisionLanguageModel(LanguageModel):
    """A Hugging Face image-text-to-text model behind the nnsight API (see module docstring)."""

    task = "image-text-to-text"

    def __init__(self, model, processor=None, tokenizer=None, automodel=None, **kwargs):
        import transformers

        if processor is None and (isinstance(model, (str, bytes)) or hasattr(model, "__fspath__")):
            processor = transformers.AutoProcessor.from_pretrained(str(model))
            own = getattr(processor, "tokenizer", None)
            if own is not None:  # a tokenizer we load starts on the left, as LanguageModel's own does
                own.padding_side = kwargs.get("padding_side") or "left"
        if tokenizer is None and processor is not None:
            tokenizer = getattr(processor, "tokenizer", None)
        super().__init__(
            model, tokenizer=tokenizer, automodel=automodel or transformers.AutoModelForImageTextToText, **kwargs
        )
        object.__setattr__(self, "processor", processor)
        # Models with multimodal rotary positions (Qwen2-VL) compute position ids from the
        # image grid themselves; counted 1-D positions would be wrong for image tokens.
        inner = getattr(self._module, "model", None)
        if any(hasattr(m, "get_rope_index") for m in (self._module, inner) if m is not None):
            object.__setattr__(self, "_takes_position_ids", False)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            found = self._alias(name)
            if found is None:
                raise
            return found

    def _alias(self, name):
        for candidate in _ALIASES.get(name, ()):
            for container in _CONTAINERS:
                module = self._module
                for part in (container + candidate).split("."):
                    module = module._modules.get(part) if module is not None and part else module
                if module is not None and module is not self._module:
                    envoy = self  # (not self.get: it reads a leading "model." as the root's own name)
                    for part in (container + candidate).split("."):
                        envoy = getattr(envoy, part)
                    return envoy
        return None

    # -- entering ------------------------------------------------------------

    def trace(self, *inputs, images=None, text=None, **kwargs):
        return super().trace(*_pack(inputs, images, text), **kwargs)

    def generate(self, *inputs, images=None, text=None, **kwargs):
        return super().generate(*_pack(inputs, images, text), **kwargs)

    def scan(self, *inputs, images=None, text=None, **kwargs):
        return super().scan(*_pack(inputs, images, text), **kwargs)

    # -- inputs ----------------------------------------------------------------

    def _prepare_input(self, *inputs, images=None, text=None, **kwargs):
        inputs = _pack(inputs, images, text)
        rows, extras = [], []
        for value in inputs:
            if isinstance(value, VisionInput):
                encodings = self._encode(value.prompts, value.images)
            elif isinstance(value, Mapping) and "input_ids" in value and len(value) > 2:
                encodings = [dict(value)]  # a processor's output, used as it is
            else:
                encodings = None
            if encodings is None:
                (text_rows,), _, _ = super()._prepare_input(value)
                rows += text_rows
                extras += [{}] * len(text_rows)
                continue
            for encoding in encodings:
                for row, extra in _split_rows(encoding):
                    rows.append(row)
                    extras.append(extra)
        if "input_ids" in kwargs:
            (id_rows,), kwargs, _ = super()._prepare_input(input_ids=kwargs.pop("input_ids"),
                                                          attention_mask=kwargs.pop("attention_mask", None))
            rows += id_rows
            extras += [{}] * len(id_rows)
        if not rows:
            raise NNsightError("a VisionLanguageModel invoke needs a prompt (text, token ids or a processor's output)")
        return (rows,), {**kwargs, "_vision": extras}, len(rows)

    def _encode(self, prompts, images):
        """One processor encoding per prompt, each with the images its image tokens ask for."""
        if self.processor is None:
            raise NNsightError("this VisionLanguageModel has no processor: pass processor=... to use images")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"VisionLanguageModel prompts must be strings, not {prompts!r}")
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        marker = getattr(self.processor, "image_token", None)
        if len(prompts) > 1 and images and marker is None:
            raise NNsightError("several prompts with images need a processor with an image_token to share them out")
        encodings, used = [], 0
        for prompt in prompts:
            wanted = len(images) - used if len(prompts) == 1 else prompt.count(marker)
            own = images[used : used + wanted]
            used += wanted
            if len(own) < wanted:
                raise NNsightError(
                    f"the prompts have {prompt.count(marker) if marker else wanted} image token(s) in {prompt!r} "
                    f"but only {len(images)} image(s) were given"
                )
            encoded = self.processor(text=[prompt], images=own or None, return_tensors="pt")
            encodings.append(dict(encoded))
        if used != len(images):
            raise NNsightError(f"{len(images)} image(s) were given but the prompts have image tokens for {used}")
        return encodings

    def _batch(self, prepared, invokers):
        extras = [extra for _, kwargs in prepared for extra in kwargs["_vision"]]
        plain = [(args, {k: v for k, v in kwargs.items() if k != "_vision"}) for args, kwargs in prepared]
        _, batch = super()._batch(plain, invokers)
        width = batch["input_ids"].shape[1]
        aligned = {k for extra in extras for k, v in extra.items() if v.get("aligned")}
        device = batch["input_ids"].device
        for key in aligned:
            padded = []
            for (ids, _), extra in zip((row for (rows,), _ in prepared for row in rows), extras):
                values = extra[key]["value"] if key in extra else [0] * len(ids)
                fill = [0] * (width - len(values))
                padded.append(fill + values if self.padding_side == "left" else values + fill)
            batch[key] = torch.tensor(padded, device=device)
        stacked = [k for k in dict.fromkeys(k for extra in extras for k, v in extra.items() if not v.get("aligned"))]
        dtype = getattr(self._module, "dtype", None)
        for key in stacked:
            value = torch.cat([extra[key]["value"] for extra in extras if key in extra]).to(device)
            if value.is_floating_point() and isinstance(dtype, torch.dtype):
                value = value.to(dtype)  # processors give float32 pixels whatever the model's dtype
            batch[key] = value
        if len(invokers) > 1:
            self._give_image_rows(invokers, prepared, extras, batch)
        return (), batch

    def _give_image_rows(self, invokers, prepared, extras, batch):
        """Each invoke's segments of tensors that count images, patches or image tokens."""
        token = getattr(self.config, "image_token_id", None)
        counts = []  # per invoke: {measure: count}
        at = 0
        for (rows,), _ in prepared:
            mine = extras[at : at + len(rows)]
            measure = {}
            for extra in mine:
                for key, value in extra.items():
                    if not value.get("aligned"):
                        measure[key] = measure.get(key, 0) + value["value"].shape[0]
            if token is not None:
                measure["image tokens"] = sum(ids.count(token) for ids, _ in rows)
            counts.append(measure)
            at += len(rows)
        measures = {m for c in counts for m in c}
        table, clash = {}, set()
        batch_size = batch["input_ids"].shape[0]
        for measure in measures:
            sizes = [c.get(measure, 0) for c in counts]
            total = sum(sizes)
            if total in (0, batch_size):
                continue
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            segments = [[(s, n)] if n else [] for s, n in zip(starts, sizes)]
            if total in table and table[total] != segments:
                clash.add(total)  # two layouts share a size: no way to tell them apart, leave it whole
            table[total] = segments
        for total in clash:
            del table[total]
        for i, invoker in enumerate(invokers):
            start, size = invoker.rows
            invoker.rows = Rows(start, size, {total: segments[i] for total, segments in table.items()})


def _pack(inputs, images, text):
    """``(prompt, images=[...])`` as one ``VisionInput``; inputs without images stay as they are."""
    if text is not None:
        inputs = (text, *inputs)
    if images is None:
        return inputs
    if len(inputs) != 1 or isinstance(inputs[0], VisionInput):
        raise NNsightError("images= goes with exactly one prompt argument (a string or a list of strings)")
    return (VisionInput(inputs[0], images),)


def _split_rows(encoding):
    """A processor encoding as ``((ids, mask), extras)`` per row; extras hold the other tensors."""
    ids = encoding["input_ids"]
    mask = encoding.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if ids.shape[0] != 1:
        raise NNsightError("a processor encoding given as input must hold one prompt (input_ids of one row)")
    keep = mask[0].bool()
    row = (ids[0][keep].tolist(), [1] * int(keep.sum()))
    extra = {}
    for key, value in encoding.items():
        if key in ("input_ids", "attention_mask") or not isinstance(value, torch.Tensor):
            continue
        if value.shape[:2] == ids.shape:  # one value per token (mm_token_type_ids, ...)
            extra[key] = {"aligned": True, "value": value[0][keep].tolist()}
        else:
            extra[key] = {"aligned": False, "value": value}
    return [(row, extra)]
