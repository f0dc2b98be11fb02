"""Each invoke of a ``generate`` ends at its own end of sequence, as if it had run alone.

    run_kwargs = with_invoke_ends(module, interleaver, run_kwargs)
    module.generate(**inputs, **run_kwargs)

Alone, a greedy ``generate`` stops once every row has emitted an end-of-sequence token;
in a batch Hugging Face keeps going, handing finished rows pad tokens, until every row
is done. ``InvokeEnds`` is a stopping criterion that never stops a row itself: after
each step it notes which rows have finished (by the end-of-sequence ids in force, the
rule Hugging Face's own ``EosTokenCriteria`` applies) and ends each invoke whose rows
have all finished (``Interleaver.end_invoke``): its code sees no later step and its
``tracer.result`` is cut to the length its solo run gives.

Used by the server's co-batched generates (each request one invoke). A local
``generate`` with several invokes keeps nnsight 0.8.1's rule: every invoke sees every
step of the batch.
"""

from __future__ import annotations

import functools

import torch


def end_of_sequence_ids(module, run_kwargs: dict) -> list:
    """The end-of-sequence ids a ``generate`` with ``run_kwargs`` stops at (its own over the config's)."""
    ids = run_kwargs.get("eos_token_id")
    if ids is None:
        config = run_kwargs.get("generation_config") or getattr(module, "generation_config", None)
        ids = getattr(config, "eos_token_id", None)
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        return [int(i) for i in ids.flatten().tolist()]
    return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]


def with_invoke_ends(module, interleaver, run_kwargs: dict) -> dict:
    """``run_kwargs`` plus an ``InvokeEnds`` criterion (unchanged when nothing ends a row early)."""
    from transformers import StoppingCriteriaList

    ids = end_of_sequence_ids(module, run_kwargs)
    if not ids:
        return run_kwargs
    criteria = StoppingCriteriaList([*(run_kwargs.get("stopping_criteria") or []), InvokeEnds(interleaver, ids)])
    return {**run_kwargs, "stopping_criteria": criteria}


def _trim(length, value):
    return value[..., :length] if isinstance(value, torch.Tensor) else value


class InvokeEnds:
    """A stopping criterion that ends invokes, never rows (see module docstring)."""

    # (No ``eos_token_id`` attribute: Hugging Face takes any criterion that has one for an
    # end-of-sequence rule and would pad rows by it.)

    def __init__(self, interleaver, stop_ids):
        self.interleaver = interleaver
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long)
        self.finished = None  # per row: emitted an end-of-sequence token at some step

    def __call__(self, input_ids, scores=None, **kwargs):
        last = input_ids[:, -1]
        done = torch.isin(last, self.stop_ids.to(last.device))
        self.finished = done if self.finished is None else self.finished | done
        interleaver = self.interleaver
        for mediator in interleaver.mediators:
            rows = mediator.rows
            if rows is None or mediator.end is not None:
                continue  # a whole-batch body (a persistent edit, a lone invoke) runs to the batch's end
            start, size = rows
            if bool(self.finished[start:start + size].all()):
                interleaver.end_invoke(mediator, functools.partial(_trim, input_ids.shape[-1]))
        return torch.zeros_like(done)
