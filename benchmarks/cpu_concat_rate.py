"""Rate of the fused CPU concat-critic loss (forward + backward) against torch.mm in one process.

    PYTHONPATH=. python benchmarks/cpu_concat_rate.py [--repeats 5]

- FactorCL critic (N = M = 256, H = 512, L = 1, float32): useful GFLOP/s of the fused loss
  (6*L*H^2 per pair plus the first-layer products) as a share of torch.mm (4096x512 @ 512x512),
  and the speed-up over the authors' materialising formulation (tile [N, M, du+dv], MLP, InfoNCE).
- MI critic (N = M = 512, d = 20, H = 512, L = 0): pairs per second and the speed-up over the
  reference's forward + backward.

Runs of the op and of torch.mm are interleaved and the medians compared, so that load from other
processes hits both alike. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import factorcl_ext as fe
from factorcl_ext import reference as ref


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def critic(N, M, du, dv, H, L, dtype=torch.float32):
    def param(*shape, scale=1.0):
        return (torch.randn(shape, dtype=dtype) * scale).requires_grad_()

    return dict(
        u=torch.randn(N, du, dtype=dtype), v=torch.randn(M, dv, dtype=dtype),
        w_u=param(H, du, scale=du**-0.5), w_v=param(H, dv, scale=dv**-0.5), b_0=param(H, scale=0.1),
        hidden_weights=[param(H, H, scale=H**-0.5) for _ in range(L)],
        hidden_biases=[param(H, scale=0.1) for _ in range(L)],
        w_out=param(H, scale=H**-0.5), b_out=param(),
    )


def fused_step(p):
    n = p["u"].shape[0]
    loss = fe.concat_critic_loss(**p, c_lse=1 / n, c_pos=-1 / n, backend="cpu")
    loss.backward()


def authors_step(p):
    u, v = p["u"], p["v"]
    N, M = u.shape[0], v.shape[0]
    x = torch.cat([u[:, None, :].expand(N, M, -1), v[None, :, :].expand(N, M, -1)], dim=2)
    h = F.relu(F.linear(x, torch.cat([p["w_u"], p["w_v"]], 1), p["b_0"]))
    for w, b in zip(p["hidden_weights"], p["hidden_biases"]):
        h = F.relu(F.linear(h, w, b))
    s = F.linear(h, p["w_out"][None], p["b_out"][None])[..., 0]
    (s.logsumexp(1).mean() - s.diagonal().mean()).backward()


def reference_step(p):
    lse, pos, _ = ref.concat_critic_stats(**p)
    (lse.mean() - pos.mean()).backward()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    info = fe.build_info()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, openmp {info['openmp']}")

    X, Y = torch.randn(4096, 512), torch.randn(512, 512)
    mm_flops = 2 * 4096 * 512 * 512

    N = M = 256
    H, L, d = 512, 1, 512
    p = critic(N, M, d, d, H, L)
    useful = N * M * 6 * L * H * H + 3 * 2 * (N + M) * d * H
    t = interleaved({"mm": lambda: torch.mm(X, Y), "fused": lambda: fused_step(p)}, args.repeats)
    mm_rate = mm_flops / t["mm"] / 1e9
    rate = useful / t["fused"] / 1e9
    print(f"torch.mm 4096x512@512x512: {t['mm'] * 1e3:.2f} ms, {mm_rate:.1f} GFLOP/s")
    print(f"FactorCL critic N=M={N} H={H} L={L} fp32, fused loss fwd+bwd: "
          f"{t['fused'] * 1e3:.1f} ms, {rate:.1f} useful GFLOP/s = "
          f"{100 * rate / mm_rate:.0f}% of torch.mm")
    ta = interleaved({"authors": lambda: authors_step(p)}, max(1, args.repeats // 2), warmup=1)
    print(f"  authors' materialising fwd+bwd: {ta['authors'] * 1e3:.1f} ms "
          f"-> fused is {ta['authors'] / t['fused']:.2f}x faster")

    N = M = 512
    H, L, d = 512, 0, 20
    p = critic(N, M, d, d, H, L)
    t = interleaved({"fused": lambda: fused_step(p), "reference": lambda: reference_step(p)},
                    args.repeats, warmup=1)
    print(f"MI critic N=M={N} d={d} H={H} L={L} fp32, fused loss fwd+bwd: "
          f"{t['fused'] * 1e3:.1f} ms ({N * M / t['fused'] / 1e6:.1f} Mpairs/s); reference fwd+bwd "
          f"{t['reference'] * 1e3:.1f} ms -> {t['reference'] / t['fused']:.1f}x")


if __name__ == "__main__":
    main()
