"""One forward call of a book-keeping layer (:class:`Call`): shared by the capture (bk_capture.py) and the layer
rules (bk_layers.py), in a module of its own so the two do not import each other."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Call:
    """One forward call of a layer: what its rule saved (inputs, statistics) and, after backward, ``g``."""

    saved: tuple
    version: int  # the input's version counter at forward: an in-place edit before backward is refused
    grad: Tensor | None = None
    extra: tuple | None = None  # what a rule's backward computed for its norms on the way (GroupNorm)
