"""User code for tests/test_serialization.py: a local module (not an installed package), sent by value."""

from __future__ import annotations

import dataclasses
import math

import torch

SCALE = 3.0


def plain(x, k: int = 2, *, shift=0.5):
    """A docstring."""
    return x * k + shift + SCALE


def recursive(n):
    return 1 if n <= 1 else n * recursive(n - 1)


def ping(n):
    return "ping" if n == 0 else pong(n - 1)


def pong(n):
    return "pong" if n == 0 else ping(n - 1)


def with_import(x):
    import math as m

    return m.sqrt(x)


def make_adder(k):
    def add(x):
        return x + k

    return add


def counter_gen(n):
    for i in range(n):
        yield i * SCALE


async def async_fn(x):
    return x


async def async_scaled(t, k: int = 2):
    """Awaits another coroutine sent by value."""
    return await async_fn(t) * k + SCALE


async def async_gen(n):
    for i in range(n):
        yield i * SCALE


async def async_collect(n):
    return [x async for x in async_gen(n)] + [y async for y in async_gen(1)]


LAMBDAS = (lambda x: x + 1, lambda x, y=SCALE: x * y)  # noqa: E731
NESTED = lambda x: (lambda y: y * 2)(x) + 1  # noqa: E731


@dataclasses.dataclass
class Point:
    x: float
    y: float = 0.0
    tags: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.norm = math.hypot(self.x, self.y)


@dataclasses.dataclass(frozen=True)
class Frozen:
    a: int
    b: str = "b"


class Base:
    kind = "base"

    def __init__(self, v):
        self.v = v

    def describe(self):
        return f"{self.kind}:{self.v}"


class Child(Base):
    kind = "child"

    def double(self):
        return self.v * 2


def uses_os():
    import os

    return os.getcwd()


def tensor_fn(t):
    return torch.relu(t) * SCALE
