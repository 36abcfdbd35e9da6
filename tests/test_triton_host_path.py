"""The Triton backend's GPU host path, run without a GPU on fake CUDA tensors.

On a GPU each Triton op is a ``torch.library.triton_op`` whose Python body plans the launches
(tile families, persistent grids, column shares, chunks of the backward, cuBLAS products in
float32) from the device's SM count and capability. Under the interpreter, which is how CI runs
the kernels, that body takes other branches (``_config.INTERPRETED``), so without this file the
GPU branches would first run on a rare GPU lease. Here the ops run under ``FakeTensorMode`` on
``cuda`` tensors, with ``torch.cuda`` reporting an H100 (132 SMs, sm_90) or an A100 (108 SMs,
sm_80): the registration (session 2 found torch 2.11's triton_op inferring schemas from
annotations), every host-side branch, and the ``wrap_triton`` launches are traced as torch.compile
would trace them; the kernels themselves do not run. Checked: each op's outputs have the shapes,
dtypes and devices of the C++ op's fake implementation (the same schema), every launch grid is
within CUDA's limits, and the kernels a path needs are launched.
"""

from __future__ import annotations

import types

import pytest
import torch

from factorcl_ext import _backends

pytestmark = [
    pytest.mark.skipif(not _backends.has_triton(), reason="needs the triton package"),
    pytest.mark.skipif(_backends.triton_interpreted(),
                       reason="TRITON_INTERPRET is set: the ops take the interpreter's branches"),
    pytest.mark.skipif(not _backends.has_cpu_kernels(),
                       reason="compares with the C++ ops' fake implementations"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: tests/test_triton.py "
                       "runs these paths for real"),
]

DEVICES = {"h100": ((9, 0), 132), "a100": ((8, 0), 108)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp64": torch.float64}
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@pytest.fixture
def gpu(monkeypatch, request):
    """torch.cuda reports the GPU named by the test's ``gpu`` parameter; yields the launches
    (kernel name, grid) the ops make."""
    from factorcl_ext.triton import ops

    capability, sms = DEVICES[request.param]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None:
                        types.SimpleNamespace(multi_processor_count=sms, major=capability[0],
                                              minor=capability[1]))
    launches = []
    real = ops._launchable

    def spy(tuner):
        class Recorder:
            def __getitem__(self, grid):
                launches.append((tuner.fn.__name__, tuple(grid)))
                return real(tuner)[grid]

        return Recorder()

    monkeypatch.setattr(ops, "_launchable", spy)
    return launches


def check_launches(launches, needed):
    names = {name for name, _ in launches}
    assert set(needed) <= names, f"launched {sorted(names)}, expected {sorted(needed)}"
    for name, grid in launches:
        assert 1 <= len(grid) <= 3, (name, grid)
        for size, limit in zip(grid, GRID_LIMITS):
            assert 1 <= size <= limit, f"{name}: grid {grid} outside CUDA's limits"


def same_meta(actual, expected, what):
    if isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), what
        for k, (a, e) in enumerate(zip(actual, expected)):
            same_meta(a, e, f"{what}[{k}]")
        return
    assert (tuple(actual.shape), actual.dtype, actual.device.type) == (
        tuple(expected.shape), expected.dtype, expected.device.type), (
        f"{what}: {tuple(actual.shape)} {actual.dtype} {actual.device} but the C++ op's fake "
        f"gives {tuple(expected.shape)} {expected.dtype} {expected.device}")


def fake_cuda(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    return mode, lambda *shape: torch.empty(*shape, device="cuda", dtype=dtype)


# (N = 16384, the memory target, in the weight-gradient test: its backward plans 1024
# chunks, seconds of host work per call)
CONCAT_SHAPES = [(37, 1000, 96, 1), (512, 512, 512, 1), (4096, 4096, 512, 1),
                 (300, 200, 64, 0), (300, 200, 64, 2)]


@pytest.mark.parametrize("gpu", list(DEVICES), indirect=True)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", CONCAT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_concat_ops_plan_and_trace(gpu, dtype, shape, deterministic):
    from factorcl_ext.triton import _config

    n, m, h, L = shape
    if dtype == "fp64" and n > 4096:
        pytest.skip("float64 is for tests: small shapes")
    mode, mk = fake_cuda(DTYPES[dtype])
    f = torch.ops.factorcl
    with mode:
        A, B, w_out, b_out = mk(n, h), mk(m, h), mk(h), mk(())
        W, b = [mk(h, h) for _ in range(L)], [mk(h) for _ in range(L)]
        acc = _config.acc_dtype(DTYPES[dtype])
        grads = [torch.empty(n, device="cuda", dtype=acc) for _ in range(3)]
        core = (A, B, W, b, w_out, b_out, "relu", "none", 7 if m >= n + 7 else None)
        stats = f.triton_pair_mlp_stats(*core, deterministic)
        same_meta(stats, f.pair_mlp_stats(*core), "pair_mlp_stats")
        check_launches(gpu, {"mlp_fwd_kernel"})
        gpu.clear()
        bwd = f.triton_pair_mlp_stats_backward(*grads, *core[:6], stats[0], *core[6:],
                                               deterministic)
        same_meta(bwd, f.pair_mlp_stats_backward(*grads, *core[:6], stats[0], *core[6:]),
                  "pair_mlp_stats_backward")
        check_launches(gpu, {"mlp_bwd_kernel"} | ({"mlp_dw_kernel"} if L else set()))
        gpu.clear()
        coefs = (0.5, -0.5 if core[-1] is not None else 0.0, 0.25)
        for compute_grad in (True, False):
            loss = f.triton_pair_mlp_loss(*core, *coefs, compute_grad, deterministic)
            same_meta(loss, f.pair_mlp_loss(*core, *coefs, compute_grad), "pair_mlp_loss")
        check_launches(gpu, {"mlp_fwd_kernel", "mlp_bwd_kernel"})


@pytest.mark.parametrize("gpu", ["h100"], indirect=True)
@pytest.mark.parametrize("mode", ["slots", "chunk"])
@pytest.mark.parametrize("n", [4096, 16384])
def test_concat_weight_gradient_modes_plan_and_trace(gpu, mode, n):
    from factorcl_ext.triton import _config

    with _config.using_dw_mode(mode):
        fmode, mk = fake_cuda(torch.bfloat16)
        with fmode:
            h = 512
            core = (mk(n, h), mk(n, h), [mk(h, h)], [mk(h)], mk(h), mk(()), "relu", "none", 0)
            out = torch.ops.factorcl.triton_pair_mlp_loss(*core, 0.5, -0.5, 0.0, True, False)
            same_meta(out, torch.ops.factorcl.pair_mlp_loss(*core, 0.5, -0.5, 0.0, True), "loss")
    check_launches(gpu, {"mlp_fwd_kernel", "mlp_bwd_kernel"})
    assert ("mlp_dw_kernel" in {name for name, _ in gpu}) == (mode == "chunk")


SEPARABLE_SHAPES = [(37, 1000, 24), (4096, 4096, 512), (65536, 65536, 512), (1000, 300, 128)]


@pytest.mark.parametrize("gpu", list(DEVICES), indirect=True)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SEPARABLE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bwd_mode", ["chunk", "fused"])
def test_separable_ops_plan_and_trace(gpu, dtype, shape, bwd_mode):
    from factorcl_ext.triton import _config

    n, m, d = shape
    if dtype == "fp64" and n > 4096:
        pytest.skip("float64 is for tests: small shapes")
    with _config.using_dot_bwd_mode(bwd_mode):
        mode, mk = fake_cuda(DTYPES[dtype])
        f = torch.ops.factorcl
        with mode:
            G, H = mk(n, d), mk(m, d)
            acc = _config.acc_dtype(DTYPES[dtype])
            grads = [torch.empty(n, device="cuda", dtype=acc) for _ in range(3)]
            offsets = (0, 1) if m >= n + 1 else (None, None)
            for deterministic in (False, True):
                stats = f.triton_pair_dot_stats(G, H, *offsets, deterministic)
                same_meta(stats, f.pair_dot_stats(G, H, *offsets), "pair_dot_stats")
                bwd = f.triton_pair_dot_stats_backward(*grads, G, H, stats[0], *offsets,
                                                       deterministic)
                same_meta(bwd, f.pair_dot_stats_backward(*grads, G, H, stats[0], *offsets),
                          "pair_dot_stats_backward")
                coefs = (0.5, 0.0 if offsets[0] is None else -0.5, 0.25)
                loss = f.triton_pair_dot_loss(G, H, *offsets, *coefs, True, deterministic)
                same_meta(loss, f.pair_dot_loss(G, H, *offsets, *coefs, True), "pair_dot_loss")
        needed = {"dot_fwd_kernel"}
        needed |= {"dot_ds_kernel"} if bwd_mode == "chunk" else {"dot_bwd_kernel"}
        check_launches(gpu, needed)


def test_float32_dot_precision_from_either_precision_api():
    """tl.dot takes TF32 for float32 when torch's CUDA matmuls do, whether set by the legacy
    torch.set_float32_matmul_precision or the newer torch.backends.cuda.matmul.fp32_precision
    (after which the legacy getter, read before, raises)."""
    from factorcl_ext.triton import _config

    old_legacy = torch.get_float32_matmul_precision()
    old_new = torch.backends.cuda.matmul.fp32_precision
    try:
        for mm, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(mm)
            assert _config.dot_precision(torch.float32) == want, mm
        for new in ("tf32", "ieee"):
            torch.backends.cuda.matmul.fp32_precision = new
            assert _config.dot_precision(torch.float32) == new
            assert _config.dot_precision(torch.bfloat16) == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision = old_new
        torch.set_float32_matmul_precision(old_legacy)


def test_mode_switches_are_read_as_the_boolean_flags(monkeypatch):
    """FACTORCL_TRITON_DW / _DOT_BWD take their mode names whatever the case and spaces, and an
    empty value is unset, as the boolean switches (it raised "got ''" at import)."""
    from factorcl_ext.triton import _config

    for raw, want in (("", "a"), ("  ", "a"), (" B ", "b"), ("A", "a")):
        monkeypatch.setenv("FACTORCL_TEST_MODE", raw)
        assert _config._Mode("FACTORCL_TEST_MODE", ("a", "b")).value == want, raw
    monkeypatch.setenv("FACTORCL_TEST_MODE", "c")
    with pytest.raises(ValueError, match="FACTORCL_TEST_MODE must be one of"):
        _config._Mode("FACTORCL_TEST_MODE", ("a", "b"))


def test_launches_run_on_the_device_of_their_tensors(monkeypatch):
    """Triton launches on the current device: an op on ``cuda:1`` tensors while ``cuda:0`` is
    current must make device 1 current for its launches (and restore device 0 after). Here
    ``torch.cuda``'s current device is a stand-in and the launch records it."""
    from factorcl_ext.triton import ops

    current = [0]

    class DeviceGuard:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    launched_on = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched_on.append(current[0])

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", DeviceGuard)
    monkeypatch.setattr(ops, "_launchable", lambda tuner: Kernel())

    class OnGpu(torch.Tensor):  # a tensor that reports a CUDA device, with no storage
        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            raise AssertionError(f"{func} called on a stand-in tensor")

    def on(index):
        return torch.Tensor._make_wrapper_subclass(OnGpu, (3,), dtype=torch.float32,
                                                   device=torch.device("cuda", index))

    tuners = {("family", False): None, ("family", True): None}
    for args in [(7, on(1)), (on(0),), (torch.empty(2),), (on(1), on(1))]:
        ops._launch(tuners, "family", (1,), args, {}, False)
    assert launched_on == [1, 0, 0, 1]
    assert current[0] == 0


def test_autotuning_restores_the_accumulators_rather_than_zeroing_them():
    """The concat backward's row pass adds chunk after chunk into the same accumulators. Under
    torch.compile, inductor keys a user kernel's tuner on its integer arguments too (torch 2.14's
    wrapper.py), so each chunk tunes at its first launch, and a ``reset_to_zero`` zeroed the
    original buffers there, erasing the earlier chunks' sums (found by reading; a GPU test in
    test_triton.py compares a compiled multi-chunk backward with eager). ``restore_value`` makes
    eager Triton put them back after each configuration and inductor benchmark on copies."""
    from factorcl_ext.triton import ops

    for tuners, accumulators in ((ops._MLP_BWD, ops._MLP_ACCUMULATORS),
                                 (ops._DOT_BWD, ops._DOT_ACCUMULATORS)):
        for tuner in tuners.values():
            assert list(tuner.restore_value) == accumulators
            assert not tuner.reset_to_zero
    for tuners in (ops._MLP_FWD, ops._MLP_DW, ops._DOT_FWD, ops._DOT_DS):  # they add into nothing
        for tuner in tuners.values():
            assert not tuner.restore_value and not tuner.reset_to_zero
