"""Guard for the hand-written backward passes of the fused ops: they are first-order only."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten


def first_order_only(op: str, grads, depends_on):
    """``grads`` (the input gradients a fused op's backward returns, nested lists allowed) as they
    are, unless autograd records the backward itself (``create_graph=True``). The fused backward
    kernels are not differentiable, so PyTorch would then treat them as constants and give a
    second derivative through them as silent zeros; instead the gradients come back behind a node
    that raises, naming the op, if anything is ever differentiated through them (the technique of
    ``torch.autograd.function.once_differentiable``). That node takes ``depends_on`` (the tensors
    the backward read: saved inputs or outputs) as inputs too, so that a second derivative with
    respect to any of them reaches it and raises rather than reporting the tensor unused.
    ``backend="reference"`` supports higher order gradients."""
    if not torch.is_grad_enabled():
        return grads
    flat, spec = tree_flatten(grads)
    where = [i for i, t in enumerate(flat) if isinstance(t, Tensor)]
    if not where:
        return grads
    links = [t for t in depends_on if isinstance(t, Tensor) and t.requires_grad]
    raising = torch._C._functions.DelayedError(
        f"factorcl_ext: the backward of {op} is first-order only; a second derivative through "
        "it (create_graph=True, then differentiating the gradient) needs backend='reference'",
        len(where) + len(links),
    )
    out = raising(*[flat[i].detach().requires_grad_() for i in where], *links)
    out = out if isinstance(out, tuple) else (out,)
    for i, t in zip(where, out):
        flat[i] = t
    return tree_unflatten(flat, spec)


def register_core_autograd(prefix: str, mlp_stats_backward, dot_stats_backward) -> None:
    """Autograd of one backend's four core ops ``{prefix}pair_mlp_stats``, ``..._loss``,
    ``{prefix}pair_dot_stats``, ``..._loss`` (``prefix`` "factorcl::" for the C++ ops,
    "factorcl::triton_" for the Triton twins; same schemas, DESIGN.md section 5, but for the
    Triton ops' extra non-tensor arguments at the end, passed on to their backward op):

    - the stats ops save their inputs and lse and call their hand-written backward op
      (``mlp_stats_backward`` / ``dot_stats_backward``), a missing upstream gradient as zeros;
    - the loss ops formed their input gradients in the forward pass (``compute_grad=True``);
      backward scales them by the upstream gradient.

    Every returned gradient goes through :func:`first_order_only`. A stats op's gradients depend
    on its upstream gradients through a hand-written kernel too, so those are among what
    ``depends_on`` links: a derivative with respect to them (the double-backward trick of
    ``torch.autograd.functional.jvp``) raises instead of coming back as zeros. A loss op's are
    scaled by the upstream gradient after the guard, with a recorded product, so that derivative
    is exact there."""

    def zeros_for_missing(grads, like):
        return [g if g is not None else torch.zeros_like(like) for g in grads]

    def scaled(grads, by: Tensor):
        # grads: tensors and lists of tensors. One _foreach_mul per dtype rather than a product
        # per tensor, and no pytree: this runs once per backward, where host time counts.
        # Under create_graph=True the product is recorded, so a derivative with respect to the
        # upstream gradient is exact (torch.autograd.functional.jvp's double-backward trick);
        # per tensor there, as _foreach_mul's derivative for a tensor scalar fails, and under
        # vmap (autograd.grad's is_grads_batched, jacobian(vectorize=True)), which has no
        # batching rule for it.
        flat = [t for g in grads for t in (g if isinstance(g, (list, tuple)) else (g,))]
        functorch = torch._C._functorch
        if (torch.is_grad_enabled() or functorch.is_batchedtensor(by)
                or functorch.is_legacy_batchedtensor(by)):
            out = [t * by.to(t.dtype) for t in flat]
        else:
            out = [None] * len(flat)
            for dtype in {t.dtype for t in flat}:
                where = [i for i, t in enumerate(flat) if t.dtype == dtype]
                products = torch._foreach_mul([flat[i] for i in where], by.to(dtype))
                for i, t in zip(where, products):
                    out[i] = t
        it = iter(out)
        return tuple([next(it) for _ in g] if isinstance(g, (list, tuple)) else next(it)
                     for g in grads)

    def saveable(*tensors):
        # the recomputing backward reads its inputs; one made under torch.inference_mode
        # (frozen features, a memory bank filled without gradients) cannot be saved as it is,
        # and PyTorch would refuse the call although the gradients asked for are other inputs'
        # (the concat reference, which saves no input of the fused op, runs): a copy is saved,
        # O((N+M)*H). Not under torch.compile, whose traced tensors do not say they are inference
        # tensors: there PyTorch's own error (clone the input) stands.
        return [t.clone() if t.is_inference() else t for t in tensors]

    def check_compute_grad(ctx, op):
        if not ctx.compute_grad:
            raise RuntimeError(
                f"{op} ran without forming its gradients (compute_grad=False: gradients were "
                "off, or no input required them, when it was called or when torch.export / "
                "tracing recorded the call); run it with torch.enable_grad() and inputs that "
                "require grad (export under them too) to differentiate it")

    # -- concat critic --------------------------------------------------------------------
    def mlp_stats_setup(ctx, inputs, output):
        A, B, hidden_weights, hidden_biases, w_out, b_out, *config = inputs
        ctx.num_layers = len(hidden_weights)
        ctx.config = tuple(config)  # activation, out_activation, pos_offset, ...
        ctx.save_for_backward(*saveable(A, B, w_out, b_out, output[0], *hidden_weights,
                                        *hidden_biases))

    def mlp_stats_bwd(ctx, grad_lse, grad_pos, grad_rowsum):
        saved = ctx.saved_tensors
        A, B, w_out, b_out, lse, *rest = saved
        k = ctx.num_layers
        dA, dB, dW, db, dw_out, db_out = mlp_stats_backward(
            *zeros_for_missing((grad_lse, grad_pos, grad_rowsum), lse), A, B, list(rest[:k]),
            list(rest[k:]), w_out, b_out, lse, *ctx.config,
        )
        grads = (dA, dB, list(dW), list(db), dw_out, db_out)
        read = (*saved, grad_lse, grad_pos, grad_rowsum)
        return (*first_order_only("pair_mlp_stats", grads, read), *[None] * len(ctx.config))

    def mlp_loss_setup(ctx, inputs, output):
        ctx.num_layers = len(inputs[2])
        ctx.compute_grad = inputs[12]
        ctx.num_config = len(inputs) - 6
        _, dA, dB, dW, db, dw_out, db_out = output
        ctx.save_for_backward(dA, dB, dw_out, db_out, *dW, *db)

    def mlp_loss_bwd(ctx, grad_loss, *_unused):
        check_compute_grad(ctx, "pair_mlp_loss")
        saved = ctx.saved_tensors
        dA, dB, dw_out, db_out, *rest = saved
        k = ctx.num_layers
        grads = first_order_only("pair_mlp_loss",
                                 (dA, dB, list(rest[:k]), list(rest[k:]), dw_out, db_out), saved)
        return (*scaled(grads, grad_loss), *[None] * ctx.num_config)

    # -- separable critic -----------------------------------------------------------------
    def dot_stats_setup(ctx, inputs, output):
        G, H, *config = inputs
        ctx.config = tuple(config)  # pos_offset, exclude_offset, ...
        ctx.save_for_backward(*saveable(G, H, output[0]))

    def dot_stats_bwd(ctx, grad_lse, grad_pos, grad_rowsum):
        G, H, lse = saved = ctx.saved_tensors
        dG, dH = dot_stats_backward(*zeros_for_missing((grad_lse, grad_pos, grad_rowsum), lse),
                                    G, H, lse, *ctx.config)
        read = (*saved, grad_lse, grad_pos, grad_rowsum)
        return (*first_order_only("pair_dot_stats", (dG, dH), read), *[None] * len(ctx.config))

    def dot_loss_setup(ctx, inputs, output):
        ctx.compute_grad = inputs[7]
        ctx.num_config = len(inputs) - 2
        ctx.save_for_backward(output[1], output[2])

    def dot_loss_bwd(ctx, grad_loss, *_unused):
        check_compute_grad(ctx, "pair_dot_loss")
        saved = ctx.saved_tensors
        grads = first_order_only("pair_dot_loss", tuple(saved), saved)
        return (*scaled(grads, grad_loss), *[None] * ctx.num_config)

    for op, backward, setup in (
        ("pair_mlp_stats", mlp_stats_bwd, mlp_stats_setup),
        ("pair_mlp_loss", mlp_loss_bwd, mlp_loss_setup),
        ("pair_dot_stats", dot_stats_bwd, dot_stats_setup),
        ("pair_dot_loss", dot_loss_bwd, dot_loss_setup),
    ):
        torch.library.register_autograd(prefix + op, backward, setup_context=setup)
