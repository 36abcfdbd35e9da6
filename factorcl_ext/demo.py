"""A short demo: the FactorCL InfoNCE critic (N = 256, d = 128, H = 512, L = 1), fused against the
authors' materialising formulation, forward + backward, same weights; prints the value agreement,
the time and the peak extra memory of each.

    python -m factorcl_ext.demo [--batch 256] [--dim 128] [--hidden 512] [--layers 1]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from . import build_info, reference
from .measure import (
    MEMORY_UNAVAILABLE,
    concat_critic_flops,
    matmul_gflops,
    median_seconds,
    peak_extra_rss_bytes,
)
from .nn import InfoNCECritic


class _MaterialisingInfoNCE(nn.Module):
    """The authors' formulation with the same parameters as the fused critic."""

    def __init__(self, critic: InfoNCECritic):
        super().__init__()
        self._f = critic._f

    def forward(self, x, y):
        return reference.tiled_infonce_loss(self._f, x, y)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    for name in ("batch", "dim", "hidden", "layers", "repeats"):
        least = 0 if name == "layers" else 1
        if getattr(args, name) < least:
            p.error(f"--{name} must be at least {least}, got {getattr(args, name)}")
    torch.manual_seed(0)
    n, d, h, L = args.batch, args.dim, args.hidden, args.layers
    info = build_info()
    print(f"factorcl-ext demo: InfoNCE concat critic, N={n}, d={d}, H={h}, L={L}, float32, "
          f"{torch.get_num_threads()} threads; backends {info['available_backends']}")
    fused = InfoNCECritic(d, d, h, L, "relu", backend="auto")
    naive = _MaterialisingInfoNCE(fused)
    x = torch.randn(n, d, requires_grad=True)
    y = torch.randn(n, d, requires_grad=True)

    def clear_grads(module):
        module.zero_grad(set_to_none=True)
        x.grad = y.grad = None

    def step(module):
        def run():
            clear_grads(module)
            loss = module(x, y)
            loss.backward()
            return loss
        return run

    loss_fused = step(fused)().item()
    grad_fused = fused._f[0].weight.grad.clone()
    loss_naive = step(naive)().item()
    grad_naive = fused._f[0].weight.grad.clone()
    gerr = (grad_fused - grad_naive).norm().item() / grad_naive.norm().item()
    print(f"loss: fused {loss_fused:.6f}  materialising {loss_naive:.6f}  "
          f"(first-layer weight gradient relative difference {gerr:.1e})")
    rate = matmul_gflops() if L else None
    flops = concat_critic_flops(n, n, h, L, d, d)
    rows = []
    for name, module in (("fused (factorcl_ext)", fused), ("materialising (authors')", naive)):
        t = median_seconds(step(module), repeats=args.repeats)
        # the last timed call's gradients released first: the measured call's own count
        mem = peak_extra_rss_bytes(step(module), before=lambda m=module: clear_grads(m))
        rows.append((name, t, mem))
    # L = 0 is element-wise bound, no hidden-layer FLOPs: rated in pairs per second (DESIGN.md)
    rate_name = "GFLOP/s" if L else "Mpair/s"
    print(f"\n{'critic, forward+backward':<26}{'time':>10}{'peak extra memory':>20}"
          f"{rate_name:>10}")
    for name, t, mem in rows:
        mem = f"{mem / 2**20:>17.1f}MiB" if mem is not None else f"{'n/a':>20}"
        print(f"{name:<26}{t * 1e3:>8.1f}ms{mem}{(flops / 1e9 if L else n * n / 1e6) / t:>10.1f}")
    (_, tf, mf), (_, tn, mn) = rows
    share = (f"uses {100 * mf / max(mn, 1):.1f}% of the memory" if None not in (mf, mn)
             else f"({MEMORY_UNAVAILABLE})")
    speed = (f"{tn / tf:.2f}x faster" if tn >= tf
             else f"{tf / tn:.2f}x slower (at this size the time is Python and dispatch)")
    against = (f"torch.mm (4096x512x512) runs at {rate:.1f} GFLOP/s here, the fused critic at "
               f"{100 * flops / tf / 1e9 / rate:.0f}% of it" if L else
               "an L = 0 critic does element-wise work per pair, no matrix products: rated in "
               "pairs per second")
    print(f"\nfused is {speed} and {share}; {against}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
