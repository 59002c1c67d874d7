"""Live taps for training losses: activations stay on device and attached to the autograd graph.

`hooks.capture` detaches and moves to CPU (right for analysis, useless for a loss). A method's
hidden-state loss reads the activations of the SAME forward that computes the cross-entropy,
so no second forward is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

from latentguard.hooks.edits import edit
from latentguard.hooks.sites import Site, parse_sites

__all__ = ["capture_live"]


@contextmanager
def capture_live(model: nn.Module, sites: Sequence[str | Site]) -> Iterator[dict[str, Tensor]]:
    """Yield `{site: activation}` of the latest forward inside the block, graph-attached, on device.

    Each forward overwrites the previous entry, so a block holds one forward's tensors at a time.
    Hooks are removed on exit, also on error.
    """
    keys = [str(s) for s in parse_sites(model, [str(s) for s in sites])]
    live: dict[str, Tensor] = {}

    def recorder(key: str) -> Callable[[Tensor], None]:
        def fn(x: Tensor) -> None:
            live[key] = x

        return fn

    with edit(model, {k: recorder(k) for k in keys}):
        yield live
