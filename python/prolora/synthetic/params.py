"""Parameter lists: the (name, shape) of every parameter of a synthetic model, in state_dict order.

Each family's synthetic part builds its own lists (they mirror diffusers' model classes exactly,
so that a synthetic file is laid out like a real one without importing diffusers; the tests check
them against those classes) with `ParamList`'s helpers; a family config's `params()` gives them
per component, and `model_params` asks it.
"""
from __future__ import annotations

from typing import Any

Params = list[tuple[str, tuple[int, ...]]]


class ParamList(list):
    """A growing parameter list with the module helpers models are made of."""

    def linear(self, name: str, out: int, inp: int, bias: bool = True) -> None:
        self.append((f"{name}.weight", (out, inp)))
        if bias:
            self.append((f"{name}.bias", (out,)))

    def conv(self, name: str, out: int, inp: int, k: int) -> None:
        self += [(f"{name}.weight", (out, inp, k, k)), (f"{name}.bias", (out,))]

    def norm(self, name: str, ch: int) -> None:
        self += [(f"{name}.weight", (ch,)), (f"{name}.bias", (ch,))]


def model_params(cfg: Any) -> dict[str, Params]:
    """{component: params}: what a family config says its model holds (its `params()`), e.g. a
    UNet and its text encoders, or one transformer."""
    return cfg.params()
