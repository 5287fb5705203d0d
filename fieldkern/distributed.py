"""Data-parallel training with ``torch.distributed``: process groups, sharding, collectives.

The trainers take a :class:`DistContext` saying which rank of how many processes they are.
:func:`init_from_env` builds one from the variables ``torchrun`` sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), initialising the default
process group with NCCL on GPUs and gloo on the CPU; without those variables it returns the
single-process context, and nothing changes.

    ctx = init_from_env("cuda")          # cuda:LOCAL_RANK under torchrun, else as given
    ...
    shutdown(ctx)

Every collective helper here is a no-op on a single process, so trainer code is written
once. A failure on one rank must not leave the others waiting in the next collective:
:meth:`DistContext.agree` (used as ``with ctx.agree("writing the checkpoint"): ...``)
makes every rank raise when any rank failed inside the block.
"""

from __future__ import annotations

import os
import pickle
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(RuntimeError):
    """Another rank failed; raised on the ranks that did not fail themselves."""


class _GatherRows(torch.autograd.Function):
    """All-gather of row blocks of possibly different sizes (padded to the largest: gloo's
    all_gather needs equal sizes); backward: all-reduce (sum), then this rank's rows."""

    @staticmethod
    def forward(ctx, local, dctx, sizes):
        width = max(sizes)
        dev = dctx._comm_device()
        buf = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=dev)
        buf[: local.shape[0]] = local.detach().to(dev)
        parts = [torch.empty_like(buf) for _ in range(dctx.world_size)]
        dist.all_gather(parts, buf)
        lo = sum(sizes[: dctx.rank])
        ctx.rows = (lo, lo + local.shape[0])
        ctx.dctx = dctx
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(local.device)

    @staticmethod
    def backward(ctx, grad):
        total = ctx.dctx.all_reduce_sum(grad.contiguous())
        lo, hi = ctx.rows
        return total[lo:hi], None, None


def launched_with_torchrun() -> bool:
    """True when ``torchrun`` (or any launcher setting ``RANK`` and ``WORLD_SIZE``) started us."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a data-parallel job.

    Attributes:
        rank, world_size, local_rank: as ``torchrun`` numbers them (``0, 1, 0`` alone).
        backend: ``"nccl"``, ``"gloo"`` or None (no process group).
        device: this rank's device (``cuda:LOCAL_RANK`` under torchrun on GPUs).
        owns_group: :func:`init_from_env` created the process group (:func:`shutdown`
            destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @classmethod
    def single(cls, device="cpu") -> DistContext:
        return cls(device=torch.device(device))

    @property
    def distributed(self) -> bool:
        """More than one process: collectives communicate."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that writes outputs and checkpoints."""
        return self.rank == 0

    # -- sharding ---------------------------------------------------------------------------

    def bounds(self, n: int) -> list[int]:
        """Contiguous blocks: rank ``r`` owns items ``bounds[r] .. bounds[r + 1] - 1`` of ``n``
        (sizes differ by at most one)."""
        return [r * n // self.world_size for r in range(self.world_size + 1)]

    def shard(self, n: int) -> tuple[int, int]:
        """``(lo, hi)``: the block of ``n`` items this rank owns."""
        b = self.bounds(n)
        return b[self.rank], b[self.rank + 1]

    # -- collectives (no-ops on one process) ---------------------------------------------------

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``t`` over ranks (a new tensor on ``t``'s device)."""
        if not self.distributed:
            return t
        buf = t.detach().to(self._comm_device(), copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(t.device)

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``t`` with rank ``src``'s ``t`` on every rank; returns ``t``."""
        if not self.distributed:
            return t
        buf = t.detach().to(self._comm_device(), copy=True)
        dist.broadcast(buf, src=src)
        with torch.no_grad():
            t.copy_(buf)
        return t

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's block of rows, concatenated along dim 0 in rank order, on every rank.

        Rank ``r`` passes rows ``bounds(n)[r] .. bounds(n)[r + 1] - 1`` of an ``n``-row tensor
        (its :meth:`shard`); all other dimensions must match. Differentiable: the backward
        sums the incoming gradients over ranks and returns this rank's rows, so a parameter
        that produced ``local`` gets the gradient of the sum of every rank's loss.
        """
        b = self.bounds(n)
        sizes = [b[r + 1] - b[r] for r in range(self.world_size)]
        if local.shape[0] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank} owns {sizes[self.rank]} of {n} rows, got {local.shape[0]}")
        if not self.distributed:
            return local
        return _GatherRows.apply(local, self, sizes)

    def broadcast_object(self, obj, src: int = 0):
        """``obj`` of rank ``src`` on every rank (pickled; keep it small)."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self._comm_device())
        return box[0]

    def gather_object(self, obj, dst: int = 0) -> list | None:
        """Every rank's ``obj`` in rank order on ``dst`` (None elsewhere)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        if self.backend == "nccl":
            # gather_object over NCCL is newer than torch 2.4; all_gather_object is not.
            everything = [None] * self.world_size
            dist.all_gather_object(everything, obj)
            return everything if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def data_parallel(self, module: torch.nn.Module, device=None, sync_buffers: bool = True) -> torch.nn.Module:
        """``module`` wrapped in ``DistributedDataParallel`` on ``device`` (default this rank's;
        its construction broadcasts rank 0's parameters). ``sync_buffers=False``: no buffer
        broadcast before every forward, for modules whose buffers are equal on every rank."""
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        device = self.device if device is None else torch.device(device)
        ids = [device.index] if device.type == "cuda" else None
        # torch >= 2.13 renames broadcast_buffers to forward_sync_buffers.
        params = inspect.signature(DistributedDataParallel).parameters
        sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        return DistributedDataParallel(module, device_ids=ids, **{sync: sync_buffers})

    @contextmanager
    def agree(self, what: str):
        """Run a block on every rank; if it raised on any rank, raise on all of them.

        The rank that failed re-raises its own exception; the others raise
        :class:`DistributedError` naming the failed rank and its message. Every rank must
        enter the block (it ends with one collective). Only ``Exception`` is handled:
        ``KeyboardInterrupt`` and the like propagate at once (``torchrun`` then stops the
        other ranks).
        """
        error: Exception | None = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - re-raised below on this rank
            error = exc
        if self.distributed:
            flag = torch.tensor([0.0 if error is None else 1.0])
            if self.all_reduce_sum(flag).item() > 0:
                messages = self.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
                if error is None:
                    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
                    detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
                    raise DistributedError(f"{what} failed on another rank ({detail})")
        if error is not None:
            raise error


def init_from_env(device=None, backend: str | None = None, timeout_s: float = 1800.0) -> DistContext:
    """The context of this process: distributed under ``torchrun``, single otherwise.

    Under torchrun the default process group is initialised (``env://`` rendezvous) with
    ``backend`` (default NCCL when ``device`` is CUDA, gloo otherwise) and the device is
    ``cuda:LOCAL_RANK`` (``torch.cuda.set_device`` is called) or the CPU. Without torchrun's
    variables this returns :meth:`DistContext.single` on ``device`` and touches nothing.

    Args:
        device: ``"cuda"``, ``"cpu"``, a ``torch.device``, or None (CUDA if available).
            A CUDA index is ignored under torchrun: each rank takes its own GPU.
        backend: the process group's backend; default: the environment variable
            ``FIELDKERN_DIST_BACKEND``, else NCCL on CUDA and gloo on the CPU. With gloo,
            several ranks may share a GPU (rank ``LOCAL_RANK`` takes GPU ``LOCAL_RANK % n``):
            slow, but it tests multi-process code on a one-GPU machine.
        timeout_s: how long a collective may wait for the other ranks.
    """
    try:
        want = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError as exc:
        raise RuntimeError(f"--device {device}: not a device name (cpu, cuda or cuda:N)") from exc
    if want.type not in ("cpu", "cuda"):
        raise RuntimeError(f"--device {device}: fieldkern trains on cpu or cuda, not on {want.type}")
    if want.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: CUDA is not available here; use --device cpu")
    from fieldkern.backend import check_usable

    check_usable(want)  # FIELDKERN_BACKEND=triton where Triton cannot run: say so before any work
    if not launched_with_torchrun():
        return DistContext.single(want)
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise RuntimeError(f"torchrun variables are not integers: {exc}") from exc
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world}")
    backend = backend or os.environ.get("FIELDKERN_DIST_BACKEND") or None
    if want.type == "cuda":
        n = torch.cuda.device_count()
        if backend == "gloo":
            local_gpu = local % n
        elif local >= n:
            raise RuntimeError(
                f"LOCAL_RANK {local} has no GPU of its own ({n} visible): start at most {n} processes per "
                "node (torchrun --nproc_per_node), NCCL cannot share one GPU between ranks"
            )
        else:
            local_gpu = local
        want = torch.device("cuda", local_gpu)
        torch.cuda.set_device(want)
        backend = backend or "nccl"
    else:
        backend = backend or "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        owns = True
    return DistContext(rank, world, local, backend, want, owns)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_from_env` created it."""
    if ctx.owns_group and dist.is_initialized():
        # Tear down together: a gloo rank whose peer destroyed the group while its own
        # last messages were in flight aborted ("terminate called without an active
        # exception", seen in 1 of 3 test runs). A rank that failed may never get here,
        # hence the time limit (gloo's monitored barrier; NCCL has no timed barrier).
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=60))
            else:
                dist.barrier()
        except RuntimeError:
            pass  # a peer is gone: destroy our side anyway
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on this machine right now (for ``MASTER_PORT`` in local runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(*args)


def spawn_local(fn, world_size: int, *args) -> None:
    """Run ``fn(*args)`` in ``world_size`` fresh processes on this machine, with the
    variables torchrun would set, so that ``init_from_env`` inside ``fn`` joins them.

    ``fn`` must be importable by name (a module-level function). Raises if any process
    fails. Mainly for tests; use ``torchrun`` for real jobs.
    """
    import torch.multiprocessing as mp

    pickle.dumps(fn)  # fail here, not in the children, if fn cannot be sent
    mp.spawn(_spawned, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


__all__ = [
    "DistContext",
    "DistributedError",
    "free_port",
    "init_from_env",
    "launched_with_torchrun",
    "shutdown",
    "spawn_local",
]
