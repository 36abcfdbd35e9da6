"""Element-wise helpers shared by the Triton kernels (inlined into them by @triton.jit).

Activation codes: ``ACT`` 0 = relu, 1 = tanh; ``OUT`` 0 = none, 1 = softplus. Only core
``tl`` functions are used (no libdevice), so the same code runs under the interpreter.
"""

import triton
import triton.language as tl

ACT_CODES = {"relu": 0, "tanh": 1}
OUT_CODES = {"none": 0, "softplus": 1}


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        # where(z < 0, 0, z) keeps NaN, as torch.relu does
        return tl.where(z < 0, 0.0, z)
    else:
        # tanh through exp(-2|z|) <= 1: no overflow for large |z|
        e = tl.exp(-2.0 * tl.abs(z))
        y = (1.0 - e) / (1.0 + e)
        return tl.where(z < 0, -y, y)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        # torch's relu backward: 1 where the output is > 0 (0 at z == 0)
        return tl.where(z > 0, 1.0, 0.0).to(z.dtype)
    else:
        y = _act(z, 1)
        return 1.0 - y * y


@triton.jit
def _out_act(t, OUT: tl.constexpr):
    if OUT == 0:
        return t
    else:
        # nn.Softplus(beta=1, threshold=20): identity above 20, log1p(exp(t)) below; log1p
        # is not a core tl function, so small exp(t) takes its series (error < e^4/4).
        e = tl.exp(tl.minimum(t, 20.0))
        lp = tl.where(e < 1e-4, e * (1.0 - e * (0.5 - e / 3.0)), tl.log(1.0 + e))
        # 0 * t brings a NaN score through (tl.minimum may drop it)
        return tl.where(t > 20.0, t, lp + 0.0 * t)


@triton.jit
def _out_act_grad(t, OUT: tl.constexpr):
    if OUT == 0:
        return tl.full(t.shape, 1.0, t.dtype)
    else:
        e = tl.exp(tl.minimum(t, 20.0))
        return tl.where(t > 20.0, 1.0, e / (1.0 + e) + 0.0 * t).to(t.dtype)
