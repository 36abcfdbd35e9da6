"""torch.vmap for the fused core ops: a loop over the batch entries.

The ops take their hidden layers as tensor lists, which PyTorch's batching fallback cannot take
(it could batch the separable critic's ops only, with a performance warning per call). Each op of
a backend gets the same rule: the op once per batch entry, its outputs stacked along dimension 0.
Under the op, autograd records each entry's call as usual, so gradients through vmap are those of
the loop; the backward ops get the rule too, so torch.vmap over ``torch.autograd.grad``'s upstream
gradient runs them per entry. (``torch.autograd.grad(..., is_grads_batched=True)`` and
``jacobian(vectorize=True)`` use PyTorch's older vmap, which these rules do not serve: its
fallback batches the backward ops but the concat stats op's, whose tensor lists it cannot take.)
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

# The core ops and their backward ops (DESIGN.md section 5), without the namespace prefix.
CORE_OPS = (
    "pair_mlp_stats",
    "pair_mlp_stats_backward",
    "pair_mlp_loss",
    "pair_dot_stats",
    "pair_dot_stats_backward",
    "pair_dot_loss",
)


def _dims(arg, dim) -> list:
    """The batch dimension of each entry of a tensor list (``dim``: theirs, or one for all)."""
    return list(dim) if isinstance(dim, (list, tuple)) else [dim] * len(arg)


def _entry(arg, dim, b: int):
    """Batch entry ``b`` of one argument (a tensor list entry by entry); unbatched as it is."""
    if isinstance(arg, (list, tuple)):
        return [_entry(a, d, b) for a, d in zip(arg, _dims(arg, dim))]
    return arg if dim is None else arg.select(dim, b)


def _meta_entry(arg, dim):
    """An entry's shape on the meta device (for an empty batch, which has no entry)."""
    if isinstance(arg, (list, tuple)):
        return [_meta_entry(a, d) for a, d in zip(arg, _dims(arg, dim))]
    if not isinstance(arg, torch.Tensor):
        return arg
    shape = list(arg.shape)
    if dim is not None:
        del shape[dim]
    return arg.new_empty(shape, device="meta")


def _empty_batch(op, in_dims, args):
    """The outputs of a batch of 0 entries: each output's shape (from the op's fake
    implementation) with a leading 0, attached to the inputs that require grad (whose gradients
    are then zeros, as a loop over no entries gives)."""
    tensors = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
    out = op(*[_meta_entry(a, d) for a, d in zip(args, in_dims)])
    flat, spec = tree_flatten(out)
    empty = [t.new_empty((0, *t.shape), device=tensors[0].device) for t in flat]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        zero = sum(t.sum() * 0 for t in tensors if t.requires_grad)
        empty = [t + zero.to(t.dtype) for t in empty]
    return tree_unflatten(empty, spec), tree_unflatten([0] * len(empty), spec)


def _loop_rule(op):
    def rule(info, in_dims, *args):
        if info.batch_size == 0:
            return _empty_batch(op, in_dims, args)
        outs = [op(*[_entry(a, d, b) for a, d in zip(args, in_dims)])
                for b in range(info.batch_size)]
        flat = [tree_flatten(out) for out in outs]
        spec = flat[0][1]
        stacked = [torch.stack(leaves) for leaves in zip(*(f[0] for f in flat))]
        return tree_unflatten(stacked, spec), tree_unflatten([0] * len(stacked), spec)

    return rule


def register_core_vmap(prefix: str) -> None:
    """The loop rule for one backend's core ops ``{prefix}pair_mlp_stats`` ... (``prefix``
    "factorcl::" for the C++ ops, "factorcl::triton_" for the Triton twins)."""
    for name in CORE_OPS:
        qualname = prefix + name
        namespace, op_name = qualname.split("::")
        op = getattr(getattr(torch.ops, namespace), op_name).default
        torch.library.register_vmap(qualname, _loop_rule(op))
