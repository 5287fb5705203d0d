"""Memory a run needs, checked before any work: a run that cannot fit is refused with its
largest allocation named, rather than failing with allocator errors (or the OOM killer)
once training has begun.
"""

from __future__ import annotations

import torch

from fieldkern.cryoem.config import ReconstructionConfig


def memory_needs(config: ReconstructionConfig, box: int, n_particles: int, simulate: bool = False,
                 world_size: int = 1) -> dict[str, int]:
    """Bytes the largest allocations of a run take, by what they are for (a lower bound: the
    terms that grow with the settings, not every temporary). ``n_particles`` over
    ``world_size`` ranks; ``simulate``: the data set is simulated first."""
    D, N = int(box), int(n_particles)
    points = D**3 * (0.53 if config.support == "sphere" else 1.0)
    Q = 2 * D + 4  # the oversampled spectrum's tap table, per axis
    plane = D * D // 2 + D
    needs = {
        # what autograd keeps per layer and point, and the output (the Triton stack keeps
        # (L - 1) x points x hidden floats: the least of any path)
        "the field's activations on the voxel grid": int(points * (config.hidden_features * config.n_scales + 1) * 4),
        "the volume's oversampled spectrum and its gradient": int(Q**3 * 8 * 4 * 3),
        "the particle images and spectra": int(-(-N // world_size) * D * D * 12),
        "a batch's slice taps": int(min(config.batch_size, N) * plane * 8 * 20),
    }
    if simulate:
        needs["the simulated density map"] = int(D**3 * 4 * 4)
    if config.pose_search:
        G = int(config.pose_search)
        needs[f"the pose search's {G} grid slices"] = int(G * (D * D * 16 + 1024 * 12 + 72))
    return needs


def check_memory(needs: dict[str, int], device, what: str) -> None:
    """ValueError before any work when the run cannot fit: the sum of ``needs``
    (:func:`memory_needs`) beyond the free memory of ``device`` (host: MemAvailable; CUDA:
    free device memory). ``what`` names the settings in the message. Unknown free memory
    (not Linux) checks nothing."""
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return
    total = sum(needs.values())
    if total > free:
        largest = max(needs, key=needs.get)
        raise ValueError(f"{what}: the run needs at least {total / 2**30:.1f} GiB ({largest}: "
                         f"{needs[largest] / 2**30:.1f} GiB), and {free / 2**30:.1f} GiB are free on {device}")


__all__ = ["check_memory", "memory_needs"]
