"""Training steps replayed from CUDA graphs: one capture per kind of call, then replays.

A step launched from Python pays the host's cost of every kernel launch (autograd, the
optimiser, the launchers); a CUDA graph replays the whole recorded sequence of launches in
one call. :class:`GraphedSteps` runs a step function ``fn(*tensors) -> tensor or tuple``:

1. the first call of a ``key`` runs ``fn`` eagerly, on a side stream (the warm-up a capture
   needs: kernels compiled, library handles and workspaces made, optimiser state created);
2. the second captures ``fn`` on static copies of its inputs and replays it;
3. every later call copies its inputs into those static tensors and replays.

What a replay can vary is only the *values* of the tensor inputs and of the tensors ``fn``
reads from elsewhere (parameters and optimiser state updated in place). Everything else is
fixed at the capture: the shapes, and every Python value ``fn`` reads (the model's stage, a
learning rate, a step count). Those must be in the ``key``; a call with a new key for the
same ``slot`` drops the old graph and starts again at 1. Nothing in ``fn`` may wait for the
device (a host read, a data-sized operator: ``tests/cryoem/test_sync_free.py``), and its
Python side effects happen at the capture only. :meth:`GraphedSteps.clear` drops every
graph: needed whenever a tensor ``fn`` reads is *replaced* rather than updated in place
(an optimiser's ``load_state_dict``).

``capture=False`` runs the same protocol without CUDA (the CPU's stand-in, for tests): from
step 2 on it calls the function object *stored at the capture* on the static inputs. That
checks the copies in and out, and catches a value bound into the function (a
``functools.partial`` argument) that changed without changing the key; a value the
function reads from elsewhere (an attribute) is read afresh, so only a device run checks
that such values are in the key.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class _Graph:
    """One captured call: its key, static inputs and outputs, and the graph (None: emulated)."""

    def __init__(self, key, fn, inputs: tuple[torch.Tensor, ...], capture: bool):
        self.key, self.fn = key, fn
        self.inputs = tuple(t.clone() for t in inputs)
        self.graph = None
        if capture:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = _as_tuple(fn(*self.inputs))
        else:
            self.outputs = None

    def run(self, inputs) -> tuple[torch.Tensor, ...]:
        for static, t in zip(self.inputs, inputs):
            static.copy_(t)
        if self.graph is None:
            self.outputs = _as_tuple(self.fn(*self.inputs))
        else:
            self.graph.replay()
        return tuple(t.clone() for t in self.outputs)


class GraphedSteps:
    """Step functions replayed from CUDA graphs, one per slot (module docstring).

    Args:
        capture: capture CUDA graphs (the inputs must be on a CUDA device); False: emulate
            the protocol eagerly (any device).
    """

    def __init__(self, capture: bool = True):
        self.capture = capture
        self._graphs: dict[Hashable, _Graph] = {}
        self._warm: dict[Hashable, Hashable] = {}  # slot -> the key its last eager call had
        self._side = None  # the warm-ups' stream

    def __call__(self, slot: Hashable, key: Hashable, fn: Callable, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``fn(*inputs)`` as a tuple of tensors (copies: the static outputs are overwritten
        by the next replay). ``slot`` names the kind of call (one graph each), ``key``
        everything the call fixes besides its input values (shapes are added to it)."""
        key = (key, tuple((tuple(t.shape), t.dtype, t.device) for t in inputs))
        graph = self._graphs.get(slot)
        if graph is not None and graph.key == key:
            return graph.run(inputs)
        self._graphs.pop(slot, None)  # a new key: the old graph (and its memory) goes
        if self._warm.get(slot) != key:
            self._warm[slot] = key
            return self._warm_up(fn, inputs)
        graph = self._graphs[slot] = _Graph(key, fn, inputs, self.capture)
        return graph.run(inputs)

    def _warm_up(self, fn, inputs) -> tuple[torch.Tensor, ...]:
        if not self.capture:
            return _as_tuple(fn(*inputs))
        if self._side is None:
            self._side = torch.cuda.Stream()
        main = torch.cuda.current_stream()
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            out = _as_tuple(fn(*inputs))
        main.wait_stream(self._side)
        for t in out:  # made on the side stream, used on the main one: not to be reused before
            t.record_stream(main)
        return out

    def clear(self) -> None:
        """Drop every graph (and warm-up): the next call of each slot runs eagerly again."""
        self._graphs.clear()
        self._warm.clear()

    def __len__(self) -> int:
        """Graphs held (captured, or emulated)."""
        return len(self._graphs)


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


__all__ = ["GraphedSteps"]
