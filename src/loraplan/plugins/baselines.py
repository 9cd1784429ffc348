"""Baselines that ignore the data: all, random (seeded), top, bottom, every_other, and none (one stack of an
encoder-decoder model without LoRA)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from ..hooks import hookimpl
from ..strategies import SelectionContext, Selector


class _Fixed(Selector):
    data_dependent = False


class AllSelector(_Fixed):
    """Every layer (ordinary LoRA); ``ratio`` and ``count`` are ignored."""

    name = "all"

    def score(self, ctx: SelectionContext) -> dict[str, list[float]]:
        return {"importance": [1.0] * ctx.num_layers}

    def choose(self, ctx: SelectionContext, importance: list[float]) -> list[int]:
        return list(range(ctx.num_layers))


class RandomSelector(_Fixed):
    """``k`` layers drawn uniformly with ``random.Random(seed)``."""

    name = "random"

    def score(self, ctx: SelectionContext) -> dict[str, list[float]]:
        order = list(range(ctx.num_layers))
        random.Random(ctx.config.seed).shuffle(order)
        importance = [0.0] * ctx.num_layers
        for rank, layer in enumerate(order):
            importance[layer] = float(ctx.num_layers - rank)
        return {"importance": importance}


class TopSelector(_Fixed):
    """The ``k`` layers nearest the output."""

    name = "top"

    def score(self, ctx: SelectionContext) -> dict[str, list[float]]:
        return {"importance": [float(i + 1) for i in range(ctx.num_layers)]}


class BottomSelector(_Fixed):
    """The ``k`` layers nearest the input."""

    name = "bottom"

    def score(self, ctx: SelectionContext) -> dict[str, list[float]]:
        return {"importance": [float(ctx.num_layers - i) for i in range(ctx.num_layers)]}


class EveryOtherSelector(_Fixed):
    """``k`` evenly spaced layers starting at layer 0: ``floor(j * L / k)``; with ``ratio=0.5``, layers 0, 2, 4..."""

    name = "every_other"

    def _layers(self, num_layers: int, k: int) -> list[int]:
        return sorted({math.floor(j * num_layers / k) for j in range(k)})

    def score(self, ctx: SelectionContext) -> dict[str, list[float]]:
        chosen = set(self._layers(ctx.num_layers, ctx.k))
        return {"importance": [1.0 if i in chosen else 0.0 for i in range(ctx.num_layers)]}

    def choose(self, ctx: SelectionContext, importance: list[float]) -> list[int]:
        return self._layers(ctx.num_layers, ctx.k)


class NoneSelector(_Fixed):
    """No layer: for one stack of an encoder-decoder model, ``stacks={"encoder": {"selector": "none"}}``, which then
    carries no LoRA and runs without autograd (a plan must adapt some layer)."""

    name = "none"

    def score(self, ctx: SelectionContext) -> dict[str, list[float]]:
        return {"importance": [0.0] * ctx.num_layers}

    def choose(self, ctx: SelectionContext, importance: list[float]) -> list[int]:
        return []


@hookimpl
def loraplan_register_selectors(register: Callable[[Selector], None]) -> None:
    baselines = (AllSelector(), RandomSelector(), TopSelector(), BottomSelector(), EveryOtherSelector(), NoneSelector())
    for selector in baselines:
        register(selector)
