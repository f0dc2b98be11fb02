"""User code for the annotation tests: a local module *without* ``from __future__ import annotations``
(its annotations are evaluated objects); tests/serialization_helpers.py is the string-annotation case."""

import typing

import torch

SCALE = 2.0


def annotated(t: torch.Tensor, k: int = 2, *rest: float, names: list[int] | None = None, **kw: "torch.Tensor") -> torch.Tensor:
    """Annotations made of names the server has."""
    return t * k + SCALE


def unsendable(t: typing.Optional[torch.Tensor], k: typing.Any = 1) -> dict[str, typing.Any]:
    """``typing`` is not available remotely: these annotations travel as text."""
    return t * k


def multiline(t: typing.Dict[
        str,
        int], k=3):
    return 1 / 0 if k is None else t  # its line survives the rewrite above


class Holder:
    value: torch.Tensor
    extra: typing.Any = None

    def get(self) -> torch.Tensor:
        return self.value


class Pair:
    def __init__(self, a, b):
        self.a, self.b = a, b


def uses_class(p: Pair, scale: float = SCALE) -> Pair:
    return Pair(p.a * scale, p.b)
