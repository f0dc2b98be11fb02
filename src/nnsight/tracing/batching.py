"""Give each invoke its own rows of a batched value, and put its edits back.

    view = narrow(output, rows, batch_size)        # what invoke code sees
    output = merge(output, view, new, rows, batch_size)   # after `m.output = new`

``rows`` is a ``(start, size)`` pair, or ``None`` for an invoke that sees the
whole batch. Only tensors whose first dimension is the batch size are cut;
everything else (caches, config objects, scalars) is shared as it is. Views are
real views, so in-place edits such as ``m.output[0][:] = 0`` reach the model
without any merge.

A model family whose batch has tensors laid out other than one row per input
(classifier-free guidance doubling a diffusion batch, a vision tower's flat
sequence of image patches) gives each invoke a ``Rows``: its ``(start, size)``
plus, per such leading size, the segments of that tensor it owns.
"""

from __future__ import annotations

import torch


def _is_batched(value, batch_size) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size


class Rows(tuple):
    """``(start, size)`` and, for tensors with another leading size, this invoke's segments.

        rows = Rows(0, 1, {4: [(0, 1), (2, 1)]})   # a 4-row tensor: rows 0 and 2 are ours
    """

    def __new__(cls, start, size, segments=None):
        rows = super().__new__(cls, (start, size))
        rows.segments = dict(segments or {})
        return rows


def _segments(tensor, rows):
    """This invoke's ``(start, size)`` segments of a tensor whose first dim is not the batch size."""
    if isinstance(rows, Rows) and tensor.dim() > 0:
        return rows.segments.get(tensor.shape[0])
    return None


def _rebuild(value, items):
    """A container of the same type as ``value`` holding ``items``."""
    if isinstance(value, dict):
        if hasattr(value, "__dataclass_fields__"):  # transformers' ModelOutput, diffusers' BaseOutput
            # Both leave None fields out of their items; diffusers' fields have no defaults.
            missing = {f: getattr(value, f) for f in value.__dataclass_fields__ if f not in items}
            return type(value)(**items, **missing)
        rebuilt = type(value)() if type(value) is not dict else {}
        rebuilt.update(items)
        return rebuilt
    if type(value) in (tuple, list):
        return type(value)(items)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*items)
    return type(value)(items)


def narrow(value, rows, batch_size):
    """The part of ``value`` that belongs to ``rows``."""
    if rows is None:
        return value
    start, size = rows
    if isinstance(value, torch.Tensor):
        if _is_batched(value, batch_size):
            return value[start : start + size]
        segments = _segments(value, rows)
        if segments is None:
            return value
        if len(segments) == 1:  # still a view: in-place edits reach the model
            return value[segments[0][0] : segments[0][0] + segments[0][1]]
        return torch.cat([value[a : a + n] for a, n in segments])
    if isinstance(value, (tuple, list)):
        return _rebuild(value, [narrow(v, rows, batch_size) for v in value])
    if isinstance(value, dict):
        return _rebuild(value, {k: narrow(v, rows, batch_size) for k, v in value.items()})
    return value


def merge(full, view, new, rows, batch_size):
    """``full`` with the part ``view`` (what invoke code was given) replaced by ``new``."""
    if new is view:
        return full
    if isinstance(full, torch.Tensor) and isinstance(new, (int, float, bool)):
        # `m.output = 0` (as in nnsight's docs) means "this output, all zeros".
        new = torch.full_like(view, new)
    if rows is None:
        return new
    start, size = rows
    if isinstance(full, torch.Tensor):
        if not _is_batched(full, batch_size):
            segments = _segments(full, rows)
            return new if segments is None else _splice(full, segments, new)
        new = torch.as_tensor(new, dtype=full.dtype, device=full.device)
        new = new.expand(full[start : start + size].shape)
        return torch.cat([full[:start], new, full[start + size :]])
    if isinstance(full, (tuple, list)) and isinstance(new, (tuple, list)) and len(new) == len(full):
        return _rebuild(full, [merge(f, v, n, rows, batch_size) for f, v, n in zip(full, view, new)])
    if isinstance(full, dict) and isinstance(new, dict):
        merged = {k: merge(full[k], view.get(k), n, rows, batch_size) if k in full else n for k, n in new.items()}
        return _rebuild(full, merged)
    raise ValueError(
        f"cannot put a {type(new).__name__} back into this invoke's rows of a {type(full).__name__}: "
        "assign a value with the same structure as the one you read"
    )


def _splice(full, segments, new):
    """``full`` with its rows in ``segments`` replaced, in order, by the rows of ``new``."""
    ours = sum(n for _, n in segments)
    new = torch.as_tensor(new, dtype=full.dtype, device=full.device).expand((ours, *full.shape[1:]))
    pieces, at, taken = [], 0, 0
    for start, size in segments:
        pieces += [full[at:start], new[taken : taken + size]]
        at, taken = start + size, taken + size
    pieces.append(full[at:])
    return torch.cat(pieces)


def concatenate(values):
    """Join the prepared inputs of several invokes into one batch along dimension 0."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values)
    if isinstance(first, (tuple, list)):
        return _rebuild(first, [concatenate([v[i] for v in values]) for i in range(len(first))])
    if isinstance(first, dict):
        return _rebuild(first, {k: concatenate([v[k] for v in values]) for k in first})
    if any(v != first for v in values[1:]):
        raise ValueError(f"invokes disagree on a non-tensor input: {values!r}")
    return first
