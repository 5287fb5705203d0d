"""A whole multiplicative filter network: trunk, per-scale heads and residual sums.

This is the op behind :class:`fieldkern.MFN`, :class:`fieldkern.BACON` and
:class:`fieldkern.ResidualMFN`. The Triton path (:mod:`fieldkern.kernels.mfn_stack`) runs
the whole stack in one fused kernel by default, without writing hidden activations to
memory (variants: :mod:`fieldkern.ops._variants`); the reference below is the definition
it is checked against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from fieldkern.backend import get_backend, resolve
from fieldkern.checks import check_coordinates, check_shape, check_weight
from fieldkern.ops._precision import get_precision
from fieldkern.ops._stack import StackParams, StackSpec
from fieldkern.ops._variants import get_variant
from fieldkern.ops.filters import fourier_filter_reference, gabor_filter_reference
from fieldkern.ops.multiplicative_layer import multiplicative_layer_reference

HEAD_ACTIVATIONS = (None, "relu")


def mfn_stack_reference(
    x,
    filter_weight,
    filter_bias,
    linear_weight,
    linear_bias,
    head_weight,
    head_bias,
    gabor_gamma=None,
    gabor_mu=None,
    residual=False,
    head_activation=None,
    detach_heads_below=0,
):
    n_layers = len(filter_weight)
    gamma = list(gabor_gamma) if gabor_gamma is not None else [None] * n_layers
    mu = list(gabor_mu) if gabor_mu is not None else [None] * n_layers
    outputs = []
    total = None
    z = None
    for i in range(n_layers):
        if i == 0:
            if gamma[0] is None:
                z = fourier_filter_reference(x, filter_weight[0], filter_bias[0])
            else:
                z = gabor_filter_reference(x, filter_weight[0], filter_bias[0], gamma[0], mu[0])
        else:
            z = multiplicative_layer_reference(
                z, linear_weight[i - 1], linear_bias[i - 1], x,
                filter_weight[i], filter_bias[i], gamma[i], mu[i],
            )
        if head_weight[i] is None:
            continue
        # "Fair" staged BACON: earlier heads keep training on features the trunk is
        # not pulled by, so their loss cannot undo the current stage.
        z_head = z.detach() if i < detach_heads_below else z
        y = torch.nn.functional.linear(z_head, head_weight[i], head_bias[i])
        if head_activation == "relu":
            y = torch.relu(y)
        if residual:
            total = y if total is None else total + y
            outputs.append(total)
        else:
            outputs.append(y)
    return outputs


def _check_stack_args(x, filter_weight, filter_bias, linear_weight, linear_bias,
                      head_weight, head_bias, gabor_gamma, gabor_mu, head_activation):
    n_layers = len(filter_weight)
    if n_layers < 1:
        raise ValueError("filter_weight must hold at least one layer")
    for name, seq, n in (
        ("filter_bias", filter_bias, n_layers),
        ("linear_weight", linear_weight, n_layers - 1),
        ("linear_bias", linear_bias, n_layers - 1),
        ("head_weight", head_weight, n_layers),
        ("head_bias", head_bias, n_layers),
        ("gabor_gamma", gabor_gamma, n_layers),
        ("gabor_mu", gabor_mu, n_layers),
    ):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} must hold {n} entries (one per layer), got {len(seq)}")
    if (gabor_gamma is None) != (gabor_mu is None):
        raise ValueError("gabor_gamma and gabor_mu must be given together or both be None")
    if head_activation not in HEAD_ACTIVATIONS:
        raise ValueError(f"head_activation must be one of {HEAD_ACTIVATIONS}, got {head_activation!r}")
    hidden, in_features = check_weight("filter_weight[0]", filter_weight[0])
    dtype = filter_weight[0].dtype
    check_coordinates(x, in_features, dtype=dtype)
    for i in range(n_layers):
        check_shape(f"filter_weight[{i}]", filter_weight[i], (hidden, in_features), dtype)
        check_shape(f"filter_bias[{i}]", filter_bias[i], (hidden,), dtype)
        if gabor_gamma is not None:
            check_shape(f"gabor_gamma[{i}]", gabor_gamma[i], (hidden,), dtype)
            check_shape(f"gabor_mu[{i}]", gabor_mu[i], (hidden, in_features), dtype)
    for i in range(n_layers - 1):
        check_shape(f"linear_weight[{i}]", linear_weight[i], (hidden, hidden), dtype)
        check_shape(f"linear_bias[{i}]", linear_bias[i], (hidden,), dtype)
    heads = [w for w in head_weight if w is not None]
    if not heads:
        raise ValueError("head_weight must have at least one head")
    out_features = heads[0].shape[0]
    for i in range(n_layers):
        if head_weight[i] is None:
            if head_bias[i] is not None:
                raise ValueError(f"head_bias[{i}] is given for a layer without a head")
            continue
        check_shape(f"head_weight[{i}]", head_weight[i], (out_features, hidden), dtype)
        check_shape(f"head_bias[{i}]", head_bias[i], (out_features,), dtype)


#: ``backend="auto"`` on CUDA takes the PyTorch reference for a float32 call that records a
#: gradient with at most this many points and hidden width: the one kind of call measured
#: slower on Triton than eager (bench/RESULTS.md, "mfn_stack (ResidualMFN), H100": a training
#: step of the 3D hidden-128 3-scale network at 64^3 = 2^18 points, 6.38 ms against 5.64 ms,
#: launched from Python with a sync per step). Every other measured call took Triton faster
#: (forwards 1.5-2.5x, mixed precision 1.03-1.9x, 2D hidden 256 training at 2^16-2^20 points
#: 1.14-1.42x, 3D at 128^3 1.63x), so "auto" takes it there.
AUTO_REFERENCE_POINTS = 1 << 18
AUTO_REFERENCE_HIDDEN = 128


def _auto_takes_reference(x, filter_weight, others) -> bool:
    """Whether ``backend="auto"`` keeps this call on the reference (``AUTO_REFERENCE_POINTS``);
    an explicit ``set_backend("triton")`` always runs Triton."""
    if get_backend() != "auto" or get_precision() != "float32":
        return False
    points = x.numel() // max(1, x.shape[-1])
    if points > AUTO_REFERENCE_POINTS or filter_weight[0].shape[0] > AUTO_REFERENCE_HIDDEN:
        return False
    tensors = [x, *filter_weight, *(t for group in others if group is not None for t in group)]
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def mfn_stack(
    x: torch.Tensor,
    filter_weight: Sequence[torch.Tensor],
    filter_bias: Sequence[torch.Tensor],
    linear_weight: Sequence[torch.Tensor],
    linear_bias: Sequence[torch.Tensor | None],
    head_weight: Sequence[torch.Tensor | None],
    head_bias: Sequence[torch.Tensor | None],
    gabor_gamma: Sequence[torch.Tensor] | None = None,
    gabor_mu: Sequence[torch.Tensor] | None = None,
    residual: bool = False,
    head_activation: str | None = None,
    detach_heads_below: int = 0,
) -> list[torch.Tensor]:
    """Evaluate an L-layer multiplicative filter network with heads.

    Trunk: ``z_0 = g_0(x)``, ``z_i = (A_i z_{i-1} + c_i) * g_i(x)``; head at layer i:
    ``y_i = act(U_i z_i + d_i)``. Outputs, one per layer that has a head, in layer order:
    ``y_i`` or, with ``residual``, the running sum ``Y_i = sum_{k <= i} y_k``.

    Args:
        x: coordinates ``(..., d)``.
        filter_weight, filter_bias: L tensors ``(h, d)`` (rad per unit length), ``(h,)`` (rad).
        linear_weight, linear_bias: L-1 tensors ``A_i`` ``(h, h)`` and ``c_i`` ``(h,)`` or None.
        head_weight, head_bias: L entries ``U_i`` ``(o, h)``, ``d_i`` ``(o,)``; None where
            layer i has no head.
        gabor_gamma, gabor_mu: L tensors ``(h,)`` and ``(h, d)`` for Gabor filters, else None.
        residual: sum head outputs across scales (residual MFN) instead of returning each.
        head_activation: None or "relu" on each head.
        detach_heads_below: heads of layers ``i < detach_heads_below`` see ``z_i`` detached
            (no gradient reaches the trunk through them).

    Returns:
        list of ``(..., o)`` tensors, coarsest first.
    """
    _check_stack_args(x, filter_weight, filter_bias, linear_weight, linear_bias,
                      head_weight, head_bias, gabor_gamma, gabor_mu, head_activation)
    if resolve("mfn_stack", x) == "triton" and x.dtype != torch.float64 and not _auto_takes_reference(
            x, filter_weight, [filter_bias, linear_weight, linear_bias, head_weight, head_bias, gabor_gamma,
                               gabor_mu]):
        return _mfn_stack_triton(
            x, filter_weight, filter_bias, linear_weight, linear_bias, head_weight, head_bias,
            gabor_gamma, gabor_mu, residual, head_activation, detach_heads_below,
        )
    # float64 always takes the reference: the kernels compute in fp32.
    return mfn_stack_reference(
        x, filter_weight, filter_bias, linear_weight, linear_bias, head_weight, head_bias,
        gabor_gamma, gabor_mu, residual, head_activation, detach_heads_below,
    )


# --- Triton path: torch.library custom ops -------------------------------------------------
#
# ``custom_op`` (torch >= 2.4) rather than ``triton_op`` (torch >= 2.6): the op is opaque to
# the compiler either way for fullgraph capture, and ``wrap_triton`` does not accept the
# interpreter's kernels, which the CPU test-suite relies on. Per-layer parameters are
# stacked by the caller (cheap, differentiable), so the op sees a fixed set of tensors.
#
# The op boundary: the ops take tensors and scalars only, so ``StackParams`` and
# ``StackSpec`` travel as their fields, in order (tensors, then the spec, then the call's
# own flags), flattened and rebuilt here and nowhere else.

_N_PARAMS = len(StackParams._fields)
_N_SPEC = len(dataclasses.fields(StackSpec))


def _bundles(args: tuple) -> tuple[StackParams, StackSpec, tuple]:
    """The parameters, the spec and the remaining arguments from an op's flat arguments."""
    return (StackParams(*args[:_N_PARAMS]), StackSpec(*args[_N_PARAMS:_N_PARAMS + _N_SPEC]),
            tuple(args[_N_PARAMS + _N_SPEC:]))


@torch.library.custom_op("fieldkern::mfn_stack", mutates_args=())
def _mfn_stack_op(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, c: torch.Tensor | None,
    u: torch.Tensor, d: torch.Tensor, gamma: torch.Tensor | None, mu: torch.Tensor | None,
    head_mask: int, residual: bool, relu: bool, detach_heads_below: int, precision: str,
    forward: str, products: str,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, the ``StackParams`` fields, the ``StackSpec`` fields, ``save``: (L, P, O) outputs
    (rows of head-less layers: garbage) and, with ``save``, the backward's saved tensors
    (else empty)."""
    from fieldkern.kernels.mfn_stack import mfn_stack_forward

    params, spec, _ = _bundles((w, b, a, c, u, d, gamma, mu, head_mask, residual, relu, detach_heads_below,
                                precision, forward, products))
    return mfn_stack_forward(x, params, spec, save)


@_mfn_stack_op.register_fake
def _(x, *args):
    params, spec, (save,) = _bundles(args)
    L, H = params.w.shape[:2]
    P, O = x.shape[0], params.u.shape[1]
    return (x.new_empty((L, P, O)), x.new_empty((L - 1, P, H) if save else (0,)),
            x.new_empty((L, P, O) if save and spec.relu else (0,)))


@torch.library.custom_op("fieldkern::mfn_stack_backward", mutates_args=())
def _mfn_stack_backward_op(
    grad: torch.Tensor, x: torch.Tensor, lin: torch.Tensor, hpre: torch.Tensor,
    w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, c: torch.Tensor | None,
    u: torch.Tensor, d: torch.Tensor, gamma: torch.Tensor | None, mu: torch.Tensor | None,
    head_mask: int, residual: bool, relu: bool, detach_heads_below: int, precision: str,
    forward: str, products: str,
    need_dw: bool, need_da: bool,
) -> list[torch.Tensor]:
    """[dx, dW, db, dA, dc, dU, dd, dgamma, dmu]; absent ones (no bias / Fourier) are empty."""
    from fieldkern.kernels.mfn_stack import mfn_stack_backward

    params, spec, _ = _bundles((w, b, a, c, u, d, gamma, mu, head_mask, residual, relu, detach_heads_below,
                                precision, forward, products))
    dx, grads = mfn_stack_backward(grad, x, params, spec, lin=lin, hpre=hpre, need_dw=need_dw, need_da=need_da)
    return [g if g is not None else x.new_empty((0,)) for g in (dx, *grads)]


@_mfn_stack_backward_op.register_fake
def _(grad, x, lin, hpre, *args):
    params, _, _ = _bundles(args)
    return [x.new_empty(x.shape), *(x.new_empty(t.shape if t is not None else (0,)) for t in params)]


def _mfn_stack_setup_context(ctx, inputs, output):
    x, *args = inputs
    params, spec, (save,) = _bundles(args)
    _, lin, hpre = output
    ctx.mark_non_differentiable(lin, hpre)
    # no zero-filled gradients for lin / hpre (autograd would allocate (L-1) x P x H of them)
    ctx.set_materialize_grads(False)
    ctx.out_shape = output[0].shape
    ctx.save_for_backward(x, lin, hpre, *params)
    ctx.spec, ctx.save = spec, save


def _mfn_stack_autograd_backward(ctx, grad, _grad_lin, _grad_hpre):
    x, lin, hpre, *params = ctx.saved_tensors
    if not ctx.save:
        raise RuntimeError("fieldkern: mfn_stack ran without saving for backward (no input "
                           "required grad when it was called)")
    need = ctx.needs_input_grad  # x, the parameters, then the spec's and the call's scalars
    if grad is None:
        grad = x.new_zeros(ctx.out_shape)
    grads = torch.ops.fieldkern.mfn_stack_backward(
        grad.contiguous(), x, lin, hpre, *params, *ctx.spec.fields(), bool(need[1]), bool(need[3]))
    tensor_grads = [g if n and t is not None else None for g, n, t in zip(grads, need, (x, *params))]
    return (*tensor_grads, *[None] * (len(need) - len(tensor_grads)))


torch.library.register_autograd(
    "fieldkern::mfn_stack", _mfn_stack_autograd_backward, setup_context=_mfn_stack_setup_context
)


def _stack_or_zeros(tensors, shape, like):
    return torch.stack([t if t is not None else like.new_zeros(shape) for t in tensors]).float()


def _stacked_params(filter_weight, filter_bias, linear_weight, linear_bias, head_weight, head_bias,
                    gabor_gamma, gabor_mu, heads, xf) -> StackParams:
    """The per-layer parameter lists stacked into float32 contiguous tensors."""
    hidden = filter_weight[0].shape[0]
    out_features = head_weight[heads[0]].shape[0]
    b = torch.stack(list(filter_bias)).float().contiguous()
    if len(filter_weight) > 1:
        a = torch.stack(list(linear_weight)).float().contiguous()
        has_c = any(t is not None for t in linear_bias)
        c = _stack_or_zeros(linear_bias, (hidden,), b).contiguous() if has_c else None
    else:
        a, c = xf.new_zeros((0, hidden, hidden)), None
    return StackParams(
        w=torch.stack(list(filter_weight)).float().contiguous(), b=b, a=a, c=c,
        u=_stack_or_zeros(head_weight, (out_features, hidden), b).contiguous(),
        d=_stack_or_zeros(head_bias, (out_features,), b).contiguous(),
        gamma=torch.stack(list(gabor_gamma)).float().contiguous() if gabor_gamma is not None else None,
        mu=torch.stack(list(gabor_mu)).float().contiguous() if gabor_mu is not None else None,
    )


def _mfn_stack_triton(x, filter_weight, filter_bias, linear_weight, linear_bias, head_weight,
                      head_bias, gabor_gamma, gabor_mu, residual, head_activation,
                      detach_heads_below):
    in_features = filter_weight[0].shape[1]
    heads = [i for i in range(len(filter_weight)) if head_weight[i] is not None]
    lead = x.shape[:-1]
    xf = x.reshape(-1, in_features).float().contiguous()
    params = _stacked_params(filter_weight, filter_bias, linear_weight, linear_bias, head_weight, head_bias,
                             gabor_gamma, gabor_mu, heads, xf)
    # the backward reads lin_i from the forward instead of recomputing the trunk: (L-1) x P x H
    # floats kept for it, only when a gradient can be asked for
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xf, *params))
    spec = StackSpec(
        head_mask=sum(1 << i for i in heads), residual=bool(residual), relu=head_activation == "relu",
        detach_heads_below=int(detach_heads_below), precision=get_precision(),
        forward=get_variant("mfn_forward"), products=get_variant("mfn_backward_products"),
    )
    out, _, _ = torch.ops.fieldkern.mfn_stack(xf, *params, *spec.fields(), save)
    # unbind, not out[i] per head: its backward is one stack of the head gradients, where
    # each select's backward would zero-fill and add a whole (L, P, O) tensor
    per_layer = out.unbind(0)
    return [per_layer[i].reshape(*lead, params.u.shape[1]).to(x.dtype) for i in heads]
