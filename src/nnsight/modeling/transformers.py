"""``TransformersModel``: any Hugging Face model with a tokenizer, chosen by task or auto class.

    from nnsight import TransformersModel
    model = TransformersModel("smollm2-135m", task="text-generation")   # = LanguageModel
    model = TransformersModel(bert, tokenizer=tok)                      # task inferred: fill-mask
    with model.trace("The capital of France is [MASK]."):
        logits = model.output.logits.save()

Options (everything else as ``LanguageModel``: tokenizer, dispatch, padding_side,
tokenizer_kwargs, rename, envoys, and loading keywords for ``from_pretrained``):
    task        a pipeline task name ("text-generation", "fill-mask", "text-classification",
                "token-classification", "question-answering", "feature-extraction",
                "text2text-generation", ...); picks the auto class. Default: inferred from
                the model's class name (``...ForCausalLM`` -> "text-generation") or, for a repo
                id / folder, from ``config.architectures``
    automodel   the auto class (or its name) to load with, instead of a task

Inputs are text or token ids, batched and padded as ``LanguageModel`` does; ``generate``
works for generating tasks. Unlike nnsight 0.8.1 this does not build a ``transformers``
pipeline (no image, audio or multimodal preprocessors), and ``.pipe`` is not provided.
"""

from __future__ import annotations

from .language import LanguageModel

TASKS = {
    "text-generation": "AutoModelForCausalLM",
    "fill-mask": "AutoModelForMaskedLM",
    "text-classification": "AutoModelForSequenceClassification",
    "sentiment-analysis": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "ner": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "feature-extraction": "AutoModel",
    "text2text-generation": "AutoModelForSeq2SeqLM",
    "summarization": "AutoModelForSeq2SeqLM",
    "translation": "AutoModelForSeq2SeqLM",
}

# Class-name endings of Hugging Face architectures, most specific first.
_SUFFIX_TASKS = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("Model", "feature-extraction"),
)


def infer_task(architecture: str) -> str | None:
    """The task of an architecture class name (``"GPT2LMHeadModel"`` -> ``"text-generation"``)."""
    for suffix, task in _SUFFIX_TASKS:
        if architecture.endswith(suffix):
            return task
    return None


class TransformersModel(LanguageModel):
    """A Hugging Face model behind the nnsight API (see module docstring)."""

    def __init__(self, model, *args, task: str | None = None, automodel=None, **kwargs):
        if task is not None and task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
        if automodel is None:
            task = task or _task_of(model, kwargs)
            automodel = TASKS[task]
        super().__init__(model, *args, automodel=automodel, **kwargs)
        object.__setattr__(self, "task", task)


def _task_of(model, kwargs) -> str:
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        import transformers

        from .language import _HUB_KWARGS, _resolve

        config = transformers.AutoConfig.from_pretrained(
            _resolve(str(model)), **{k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
        )
        names = list(getattr(config, "architectures", None) or [])
    else:
        names = [type(model).__name__]
    for name in names:
        task = infer_task(name)
        if task is not None:
            return task
    raise ValueError(
        f"cannot tell the task of {names[0] if names else model!r}: pass task=... "
        "(e.g. TransformersModel(model, task='text-generation'))"
    )
