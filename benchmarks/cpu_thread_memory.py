"""Peak extra memory of the CPU kernels against the thread count (README, "CPU memory").

    python benchmarks/cpu_thread_memory.py [--threads 2 8 32]

Each thread count runs in its own process (VmHWM is per process and only grows): one forward +
backward of the separable fused loss (N = M = 16384, D = 128, temperature 0.1) and of the drop-in
InfoNCECritic (N = 2048, d = 64, H = 256, L = 1), float32, fresh random inputs. Peak extra memory
= VmHWM, reset before the call, minus VmRSS before it. Thread counts above the core count
oversubscribe the machine: the memory is what it would be on a machine with that many cores,
the time is not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from factorcl_ext.measure import MEMORY_UNAVAILABLE

CHILD = r"""
import json, sys, time, torch
import factorcl_ext as fx
from factorcl_ext.measure import peak_extra_rss_bytes
from factorcl_ext.nn import InfoNCECritic
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
N, D = 16384, 128
g = torch.randn(N, D, requires_grad=True)
h = torch.randn(N, D, requires_grad=True)
def separable():
    fx.separable_critic_loss(g, h, c_lse=1 / N, c_pos=-1 / N, temperature=0.1,
                             backend="cpu").backward()
critic = InfoNCECritic(64, 64, 256, 1, "relu", backend="cpu")
x = torch.randn(2048, 64, requires_grad=True)
y = torch.randn(2048, 64, requires_grad=True)
def concat():
    critic(x, y).backward()
out = {"threads": torch.get_num_threads()}
for name, step in (("separable", separable), ("concat", concat)):
    t = time.perf_counter()
    mem = peak_extra_rss_bytes(step)
    out[name + "_mib"] = mem / 2**20 if mem is not None else None
    out[name + "_s"] = time.perf_counter() - t
print(json.dumps(out))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[2, 8, 32])
    args = p.parse_args(argv)
    if any(t < 1 for t in args.threads):
        p.error("--threads must be positive")
    print("threads | separable loss N=M=16384 D=128 | InfoNCECritic N=2048 d=64 H=256 L=1")
    for t in args.threads:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(t)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if r["separable_mib"] is None:
            print(MEMORY_UNAVAILABLE, file=sys.stderr)
            return 1
        print(f"{r['threads']:>7} | +{r['separable_mib']:.0f} MiB ({r['separable_s']:.1f} s)"
              f" | +{r['concat_mib']:.0f} MiB ({r['concat_s']:.1f} s)"
              f"   [{time.perf_counter() - t0:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
