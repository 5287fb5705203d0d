"""Adam that never reads a value back to the host on a GPU.

torch's default Adam keeps each parameter's step count as a CPU scalar and reads it every
step (a host value: no GPU sync, but a step that cannot be captured in a CUDA graph). With
``capturable=True`` the counts live on the parameters' device and the update is all device
work. On the CPU torch's default is kept (``capturable`` is refused there), so CPU numbers
are unchanged.
"""

from __future__ import annotations

import torch


def adam(params, **kwargs) -> torch.optim.Adam:
    """``torch.optim.Adam(params, **kwargs)``, capturable when the parameters are on CUDA."""
    params = list(params)
    on_cuda = any(p.is_cuda for group in params for p in (group["params"] if isinstance(group, dict) else [group]))
    return torch.optim.Adam(params, capturable=on_cuda, **kwargs)


def keep_capturable(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a state saved by a CPU run (``capturable=False`` in its
    groups): capturable again on CUDA, step counts moved to the parameters' device."""
    for group in optimizer.param_groups:
        if not any(p.is_cuda for p in group["params"]):
            continue
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)


__all__ = ["adam", "keep_capturable"]
