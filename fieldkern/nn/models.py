"""Multiplicative filter networks: MFN, BACON and the residual MFN.

All three share one trunk ``z_0 = g_0(x)``, ``z_i = (A_i z_{i-1} + c_i) * g_i(x)`` and are
evaluated by the single op :func:`fieldkern.ops.mfn_stack`. They differ in where their
heads are, whether head outputs are summed across scales, and how the filter
frequencies are initialised (the paper's method section and appendix A).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from fieldkern import ops
from fieldkern.nn import init as finit
from fieldkern.nn.filters import FILTERS, _check_features
from fieldkern.checks import check_coordinates, is_int
from fieldkern.ops.mfn_stack import HEAD_ACTIVATIONS


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_scales(n_scales, resolution) -> None:
    if not is_int(n_scales) or n_scales < 1:
        raise ValueError(f"n_scales must be an int >= 1, got {n_scales!r}")
    if not is_int(resolution) or resolution < 2:
        raise ValueError(
            f"resolution must be an int >= 2 (samples per axis of the training grid), got {resolution!r}"
        )


class _FilterNetwork(nn.Module):
    """Trunk of ``n_layers`` filters and ``n_layers - 1`` linear maps, heads on some layers."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        n_layers: int,
        filter: str,
        head_layers: tuple[int, ...],
        linear_bias: bool,
        residual: bool,
        head_activation: str | None,
        trainable_frequencies: bool,
        frequencies: list[torch.Tensor],
        gamma_concentration: float,
    ):
        super().__init__()
        _check_features(in_features=in_features, hidden_features=hidden_features,
                        out_features=out_features)
        _check_choice("filter", filter, FILTERS)
        _check_choice("head_activation", head_activation, HEAD_ACTIVATIONS)
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        self.n_layers = n_layers
        self.filter = filter
        self.residual = residual
        self.head_activation = head_activation
        self._head_layers = head_layers

        kwargs = {"gamma_concentration": gamma_concentration} if filter == "gabor" else {}
        self.filters = nn.ModuleList(
            FILTERS[filter](in_features, hidden_features, trainable_frequencies=trainable_frequencies, **kwargs)
            for _ in range(n_layers)
        )
        for f, w in zip(self.filters, frequencies):
            f.set_frequencies(w)
        self.linears = nn.ModuleList(
            nn.Linear(hidden_features, hidden_features, bias=linear_bias) for _ in range(n_layers - 1)
        )
        self.heads = nn.ModuleList(nn.Linear(hidden_features, out_features) for _ in head_layers)
        for lin in [*self.linears, *self.heads]:
            finit.siren_uniform_(lin.weight)
        self._stage: int | None = None
        self._detach_heads_below = 0

    def _run(self, x: torch.Tensor, n_layers: int) -> list[torch.Tensor]:
        weight = self.filters[0].weight
        check_coordinates(x, self.in_features, dtype=weight.dtype, device=weight.device)
        tensors = [f.filter_tensors() for f in self.filters[:n_layers]]
        head_weight: list[torch.Tensor | None] = [None] * n_layers
        head_bias: list[torch.Tensor | None] = [None] * n_layers
        for layer, head in zip(self._head_layers, self.heads):
            if layer < n_layers:
                head_weight[layer], head_bias[layer] = head.weight, head.bias
        gabor = self.filter == "gabor"
        return ops.mfn_stack(
            x,
            [t["weight"] for t in tensors],
            [t["bias"] for t in tensors],
            [lin.weight for lin in self.linears[: n_layers - 1]],
            [lin.bias for lin in self.linears[: n_layers - 1]],
            head_weight,
            head_bias,
            gabor_gamma=[t["gamma"] for t in tensors] if gabor else None,
            gabor_mu=[t["mu"] for t in tensors] if gabor else None,
            residual=self.residual,
            head_activation=self.head_activation,
            detach_heads_below=self._detach_heads_below,
        )


class MFN(_FilterNetwork):
    """Multiplicative filter network (Fathony et al., ICLR 2021) with one output head.

    ``model(x)`` maps coordinates ``(..., in_features)`` to ``(..., out_features)``.
    Frequencies are trainable and start ``U(-1, 1) / sqrt(in_features) * input_scale /
    sqrt(n_layers)`` rad per unit length; Gabor precisions start
    ``Gamma(6 / n_layers, 0.25)`` (Fathony's ``alpha = 6``, ``beta = 1`` on [-1, 1]).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        n_layers: int = 4,
        input_scale: float = 256.0,
        filter: str = "fourier",
        trainable_frequencies: bool = True,
    ):
        if not is_int(n_layers) or n_layers < 1:
            raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
        if not 0 < input_scale < math.inf:
            raise ValueError(f"input_scale must be a positive finite number, got {input_scale!r}")
        _check_features(in_features=in_features, hidden_features=hidden_features)
        freqs = finit.mfn_frequencies(hidden_features, in_features, n_layers, input_scale)
        super().__init__(
            in_features, hidden_features, out_features, n_layers, filter,
            head_layers=(n_layers - 1,), linear_bias=True, residual=False, head_activation=None,
            trainable_frequencies=trainable_frequencies, frequencies=freqs,
            gamma_concentration=6.0 / n_layers,
        )
        if filter == "gabor":
            # Fathony et al. scale each frequency by sqrt(gamma) so that wide envelopes
            # (small gamma) go with low frequencies.
            for f in self.filters:
                f.set_frequencies(f.weight * f.gamma.detach().sqrt().unsqueeze(-1) / 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.n_layers)[0]


class _MultiscaleNetwork(_FilterNetwork):
    """One layer and one head per scale, with coarse-to-fine (staged) training support."""

    _stage_modes: tuple[str, ...] = ()

    @property
    def n_scales(self) -> int:
        return self.n_layers

    @property
    def band_limits(self) -> tuple[float, ...]:
        """Band limit ``B_k`` of each scale, rad per unit length per axis, coarsest first."""
        return tuple(self._band_limits)

    @property
    def stage(self) -> int | None:
        """The active stage (None: all scales train together)."""
        return self._stage

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Coordinates ``(..., in_features)`` -> list of ``(..., out_features)``, coarsest first.

        With no active stage, ``n_scales`` outputs; while stage ``s`` is active, only
        scales ``0..s`` are evaluated, so ``model(x)[-1]`` is always the output being fit.
        """
        n = self.n_layers if self._stage is None else self._stage + 1
        return self._run(x, n)

    def _apply_stage(self, stage: int | None, mode: str) -> None:
        if stage is not None and (not is_int(stage) or not 0 <= stage < self.n_layers):
            raise ValueError(f"stage must be None or an int in [0, {self.n_layers - 1}], got {stage!r}")
        stage = None if stage is None else int(stage)
        last = self.n_layers - 1 if stage is None else stage
        staged = stage is not None
        groups: list[tuple[nn.Module, bool]] = []
        for i, f in enumerate(self.filters):
            groups.append((f, i <= last))
        for i, lin in enumerate(self.linears, start=1):
            groups.append((lin, i <= last))
        for k, head in enumerate(self.heads):
            frozen_earlier = staged and mode == "unfair" and k < last
            groups.append((head, k <= last and not frozen_earlier))
        for module, trainable in groups:
            for p in module.parameters():
                p.requires_grad_(trainable)
                if not trainable:
                    # A stale gradient would let Adam keep stepping a frozen tensor.
                    p.grad = None
        self._stage = stage
        self._stage_mode = mode if staged else "vanilla"
        self._detach_heads_below = last if staged and mode == "fair" else 0

    def stage_loss(self, outputs: list[torch.Tensor], target: torch.Tensor, loss_fn=None) -> torch.Tensor:
        """The training loss of the active stage for ``outputs = model(x)``.

        No stage: sum over scales of ``loss_fn(Y_k, target)``. Staged residual MFN or
        unfair BACON: loss on ``Y_s`` only. Fair BACON: the sum over scales ``0..s`` (the
        earlier heads' terms train those heads on detached features).
        """
        loss_fn = loss_fn or torch.nn.functional.mse_loss
        if isinstance(outputs, torch.Tensor):
            raise TypeError("outputs must be the list model(x) returns (one tensor per scale), got a tensor")
        if len(outputs) == 0:  # the sum over no scales would be the int 0, not a loss
            raise ValueError("outputs is empty: pass the list model(x) returns (one tensor per scale)")
        # the losses broadcast: a (N,) target against (N, 1) outputs would give an N x N error
        for k, y in enumerate(outputs):
            if y.shape != target.shape:
                raise ValueError(
                    f"target must have the outputs' shape {tuple(y.shape)}, got {tuple(target.shape)} "
                    f"(output {k})"
                )
        if self._stage is None or self._stage_mode == "fair":
            return sum(loss_fn(y, target) for y in outputs)
        return loss_fn(outputs[-1], target)


class BACON(_MultiscaleNetwork):
    """Band-limited coordinate network (Lindell et al., CVPR 2022), one head per scale.

    Frequencies are frozen integer multiples of 2 pi in ``[-2 pi m, 2 pi m]`` with
    ``m = floor(resolution / (2 n_scales))``, so scale ``k`` is band-limited to
    ``(k + 1) 2 pi m`` rad per unit length per axis and every output is periodic on the
    unit cell. Output at scale k is head k's output alone (no sum across scales).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        n_scales: int,
        resolution: int,
        filter: str = "fourier",
        head_activation: str | None = None,
        trainable_frequencies: bool = False,
    ):
        _check_scales(n_scales, resolution)
        if finit.bacon_quantum(n_scales, resolution) < 1:
            raise ValueError(
                f"resolution={resolution} is too small for {n_scales} BACON scales: the "
                f"quantised frequencies need resolution >= 2 * n_scales = {2 * n_scales}"
            )
        _check_features(in_features=in_features, hidden_features=hidden_features)
        freqs = finit.bacon_frequencies(hidden_features, in_features, n_scales, resolution)
        super().__init__(
            in_features, hidden_features, out_features, n_scales, filter,
            head_layers=tuple(range(n_scales)), linear_bias=True, residual=False,
            head_activation=head_activation, trainable_frequencies=trainable_frequencies,
            frequencies=freqs, gamma_concentration=6.0 / n_scales,
        )
        self.resolution = resolution
        self._band_limits = finit.bacon_band_limits(n_scales, resolution)

    def set_stage(self, stage: int | None, fair: bool = True) -> None:
        """Coarse-to-fine training: make scale ``stage`` the one being fit (None: all).

        Layers and heads above ``stage`` are frozen. ``fair=True``: earlier heads keep
        training on detached trunk features (their loss cannot pull the trunk);
        ``fair=False`` ("unfair"): earlier heads are frozen after their stage.
        """
        self._apply_stage(stage, "fair" if fair else "unfair")


class ResidualMFN(_MultiscaleNetwork):
    """Residual multiplicative filter network (NeurIPS 2022).

    ``Y_k = sum_{j <= k} y_j``: each scale adds to the coarser ones through skip
    connections. ``init="residual"`` (the paper's new init, no linear biases) draws the
    frozen frequencies so that scale ``k`` is band-limited to ``B_k = pi N / c^(L-1-k)``
    rad per unit length per axis, ``c = 1 + lambda1 + lambda2``, ``N = resolution``;
    ``init="bacon"`` uses ``W_i ~ U(-pi N s_i, pi N s_i)``, ``s_i = c^-(L-1-i) - c^-(L-i)``.
    ``head_activation="relu"`` (cryo-EM densities) puts a ReLU on every head.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        n_scales: int,
        resolution: int,
        lambda1: float = 0.3,
        lambda2: float = 2.0,
        init: str = "residual",
        filter: str = "fourier",
        head_activation: str | None = None,
        trainable_frequencies: bool = False,
    ):
        _check_scales(n_scales, resolution)
        _check_choice("init", init, ("residual", "bacon"))
        for name, value in (("lambda1", lambda1), ("lambda2", lambda2)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if lambda2 > 2 + lambda1:
            warnings.warn(
                f"lambda2={lambda2} > 2 + lambda1={2 + lambda1}: the frequency rings of "
                "successive scales leave gaps in Fourier coverage",
                UserWarning,
                stacklevel=2,
            )
        _check_features(in_features=in_features, hidden_features=hidden_features)
        if init == "residual":
            freqs = finit.residual_frequencies(hidden_features, in_features, n_scales, resolution, lambda1, lambda2)
            bands = finit.residual_band_limits(n_scales, resolution, lambda1, lambda2)
        else:
            freqs = finit.bacon_init_frequencies(hidden_features, in_features, n_scales, resolution, lambda1, lambda2)
            bands = finit.bacon_init_band_limits(n_scales, resolution, lambda1, lambda2)
        super().__init__(
            in_features, hidden_features, out_features, n_scales, filter,
            head_layers=tuple(range(n_scales)), linear_bias=(init == "bacon"), residual=True,
            head_activation=head_activation, trainable_frequencies=trainable_frequencies,
            frequencies=freqs, gamma_concentration=6.0 / n_scales,
        )
        self.resolution = resolution
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.init = init
        self._band_limits = bands

    def set_stage(self, stage: int | None) -> None:
        """Coarse-to-fine training: make scale ``stage`` the one being fit (None: all).

        Layers and heads ``0..stage`` train with the loss on ``Y_stage``; those above are
        frozen. Nothing is detached: later scales can only add to coarser ones.
        """
        self._apply_stage(stage, "residual")
