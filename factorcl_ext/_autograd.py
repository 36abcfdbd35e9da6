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
