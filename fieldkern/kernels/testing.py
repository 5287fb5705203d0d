"""Testing aids for the kernels under the Triton interpreter (CPU).

The interpreter computes ``tl.dot(..., input_precision="tf32")`` in full float32, while a
GPU's tensor cores read only the top 10 mantissa bits of each float32 operand, so a float32
path that forgot to split a product (``_common.mm_split``) passes every CPU comparison and
then misses float32 tolerances by ~50x on the device. :func:`emulate_tf32_tensor_cores`
makes the interpreter round those operands as the hardware does.

:func:`count_launches` counts what a block of code launches (Triton kernels, ATen operators,
allocations, host syncs), optionally with the Triton launches no-op'd, so launch counts and
host cost are testable without a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np

#: How the emulated tensor cores drop the 13 low mantissa bits: ignored (truncation) or
#: rounded to nearest (ties to even); tests run both, as the split must hold for either.
TF32_MODES = ("truncate", "nearest")


def round_to_tf32(data: np.ndarray, mode: str) -> np.ndarray:
    """float32 values with 10 mantissa bits (inf / NaN kept)."""
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    if mode == "nearest":
        finite = (bits & np.uint32(0x7F800000)) != np.uint32(0x7F800000)
        bias = ((bits >> np.uint32(13)) & np.uint32(1)) + np.uint32(0xFFF)
        bits = np.where(finite, bits + bias, bits)
    elif mode != "truncate":
        raise ValueError(f"mode must be one of {TF32_MODES}, got {mode!r}")
    return (bits & np.uint32(0xFFFFE000)).view(np.float32)


@contextlib.contextmanager
def emulate_tf32_tensor_cores(mode: str = "truncate") -> Iterator[None]:
    """Within the block, interpreted ``tl.dot``s with ``input_precision="tf32"`` on float32
    operands round both operands to TF32 first (``mode``: see :data:`TF32_MODES`). Only
    meaningful under ``TRITON_INTERPRET=1``; other precisions are left alone."""
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    if mode not in TF32_MODES:
        raise ValueError(f"mode must be one of {TF32_MODES}, got {mode!r}")
    builder = interpreter.InterpreterBuilder
    create_dot = builder.create_dot

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32 and a.data.dtype == b.data.dtype == np.float32:
            a = interpreter.TensorHandle(round_to_tf32(a.data, mode), a.dtype)
            b = interpreter.TensorHandle(round_to_tf32(b.data, mode), b.dtype)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = dot
    try:
        yield
    finally:
        builder.create_dot = create_dot


@dataclasses.dataclass
class LaunchCount:
    """What a block of code launched (:func:`count_launches`).

    ``triton``: Triton kernel launches by kernel name, in order; ``torch``: ATen operators
    that compute (each one kernel launch on a GPU), by name; ``allocations``: operators that
    only allocate (``empty``, ``empty_strided``, ``empty_like``); ``syncs``: operators that
    read a value back to the host (``.item()``, ``bool()``, ``float()`` of a tensor, copies
    to the CPU from another device), which stall the GPU and break CUDA-graph capture."""

    triton: list[str] = dataclasses.field(default_factory=list)
    torch: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    allocations: int = 0
    syncs: list[str] = dataclasses.field(default_factory=list)

    @property
    def launches(self) -> int:
        """Kernel launches a GPU would see: Triton kernels plus computing ATen operators."""
        return len(self.triton) + sum(self.torch.values())


# ATen operators that launch nothing: allocations and metadata (views are excluded by their
# schema, see ``_classify``).
_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
_NO_LAUNCH = {"detach", "alias", "lift_fresh", "set_", "resize_", "is_same_size",
              "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_has_compatible_shallow_copy_type",
              "is_pinned", "_local_scalar_dense"}


@contextlib.contextmanager
def count_launches(noop: bool = False) -> Iterator[LaunchCount]:
    """Count the kernel launches, allocations and host syncs of a block (:class:`LaunchCount`;
    host syncs include ``Tensor.tolist``/``numpy`` calls, :func:`python_host_reads`).

    ``noop``: Triton launches return at once instead of running (see :func:`triton_launches`).
    Views and metadata queries are not counted; a ``fieldkern::`` custom op is looked into:
    what its implementation runs is counted, not the op itself."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    count = LaunchCount()

    class _Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "fieldkern":
                device = next(a.device for a in args if isinstance(a, torch.Tensor))
                keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA if device.type == "cuda"
                                               else torch._C.DispatchKey.CPU)
                with self:
                    return func.redispatch(keys, *args, **kwargs)
            _classify(count, func, args, kwargs)
            return func(*args, **kwargs)

    with triton_launches(noop=noop, record=count.triton), python_host_reads(count.syncs.append), _Counter():
        yield count


@contextlib.contextmanager
def python_host_reads(on_read) -> Iterator[None]:
    """Within the block, ``Tensor.tolist`` and ``Tensor.numpy`` call ``on_read(name)`` first:
    they read a tensor's memory directly, so no dispatch mode sees them (``.item()``,
    ``float()``, ``bool()`` and copies are seen as ``_local_scalar_dense`` and ``_to_copy``)."""
    import torch

    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def recorded(name, original):
        def read(self, *args, **kwargs):
            on_read(name)
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, recorded(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def triton_launches(noop: bool = False, record: list | None = None) -> Iterator[list]:
    """Within the block, every Triton launch (interpreted or compiled, through
    ``@triton.autotune`` too) appends its kernel's name to ``record`` (a new list by default,
    yielded); with ``noop`` it then returns at once instead of running, so the Python cost
    of a call can be timed without its kernels (their outputs are whatever the allocations
    held)."""
    from triton.runtime import interpreter, jit

    names = [] if record is None else record
    originals = {cls: cls.run for cls in (interpreter.InterpretedFunction, jit.JITFunction)}

    def counted(original):
        def run(self, *args, **kwargs):
            if kwargs.get("warmup"):
                return original(self, *args, **kwargs)
            names.append(getattr(self, "__name__", None) or self.fn.__name__)
            return None if noop else original(self, *args, **kwargs)
        return run

    for cls, original in originals.items():
        cls.run = counted(original)
    try:
        yield names
    finally:
        for cls, original in originals.items():
            cls.run = original


def _classify(count: LaunchCount, func, args, kwargs) -> None:
    name = func.overloadpacket.__name__
    if name in ("_local_scalar_dense", "item"):  # "item" itself where a custom op's body calls it
        count.syncs.append(name)
    elif name in ("_to_copy", "copy_") and _to_host(func, args, kwargs):
        count.syncs.append(name)
    elif name in _ALLOCATIONS:
        count.allocations += 1
    elif not func.is_view and name not in _NO_LAUNCH:
        count.torch[name] += 1


def _to_host(func, args, kwargs) -> bool:
    """A copy from a non-CPU tensor into host memory."""
    import torch

    name = func.overloadpacket.__name__
    if name == "copy_":
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and isinstance(src, torch.Tensor) and src.device.type != "cpu"
    src = args[0]
    dev = kwargs.get("device")
    return src.device.type != "cpu" and dev is not None and torch.device(dev).type == "cpu"
