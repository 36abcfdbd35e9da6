"""The README's first command, ``python -m factorcl_ext.demo``, at a small size: it prints the
fused and the materialising critic's losses, which agree, and the comparison line; bad sizes are
one usage error (exit status 2), not a traceback."""

from __future__ import annotations

import re

import pytest
import torch

import factorcl_ext
from factorcl_ext import demo


def test_demo_runs_and_the_two_critics_agree(capsys):
    if "cpu" not in factorcl_ext.available_backends():
        pytest.skip("the fused CPU kernels are not built")
    assert demo.main(["--batch", "24", "--dim", "7", "--hidden", "20", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"loss: fused (\S+)\s+materialising (\S+)\s+\(first-layer weight gradient "
                  r"relative difference (\S+)\)", out)
    assert m, out
    fused, naive, gerr = (float(v) for v in m.groups())
    assert fused == pytest.approx(naive, rel=1e-5) and gerr < 1e-4
    assert re.search(r"fused is \d+\.\d+x (faster|slower \(at this size the time is Python and "
                     r"dispatch\)) and uses \d+\.\d+% of the memory", out), out


def test_demo_rates_an_l0_critic_in_pairs_per_second(capsys):
    # element-wise bound (DESIGN.md): it printed GFLOP/s of the first layer and "0% of" torch.mm
    if "cpu" not in factorcl_ext.available_backends():
        pytest.skip("the fused CPU kernels are not built")
    assert demo.main(["--batch", "24", "--dim", "7", "--hidden", "20", "--layers", "0",
                      "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "Mpair/s" in out and "GFLOP/s" not in out and "% of it" not in out, out
    assert "rated in pairs per second" in out, out


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--hidden", "-2"], ["--layers", "-1"],
                                  ["--repeats", "0"]])
def test_demo_rejects_bad_sizes(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{argv[0]} must be at least" in err and "Traceback" not in err


def test_peak_extra_memory_counts_reused_heap_memory():
    """Memory a previous call freed, and the C heap kept resident, counts again when the measured
    call reuses it (it read as 0 MiB before the heap's free pages were released first)."""
    import ctypes

    from factorcl_ext.measure import peak_extra_rss_bytes

    if not hasattr(ctypes.CDLL(None), "malloc_trim"):
        pytest.skip("not glibc: the heap is not trimmed")

    def alloc():  # 24 MiB in 1 MiB blocks: below glibc's largest mmap threshold, so heap memory
        blocks = [torch.ones(2**18) for _ in range(24)]
        return sum(float(b[0]) for b in blocks)

    alloc()
    alloc()
    assert peak_extra_rss_bytes(alloc) >= 20 * 2**20


def test_peak_extra_memory_counts_a_step_that_replaces_its_gradients():
    """A training step frees the previous call's gradients and allocates its own: measured
    after a timed call, they were resident in the baseline and the step read as using nothing
    (0.004 MiB for a 64 MiB gradient); ``before`` releases them first."""
    from factorcl_ext.measure import peak_extra_rss_bytes

    x = torch.zeros(16 * 2**20, requires_grad=True)  # 64 MiB: mmap'd, returned when freed

    def step():
        x.grad = None
        (x * 2.0).sum().backward()

    step()
    if peak_extra_rss_bytes(lambda: None) is None:
        pytest.skip("peak memory cannot be measured here")
    measured = peak_extra_rss_bytes(step, before=lambda: setattr(x, "grad", None))
    assert measured >= 60 * 2**20, measured


def test_demo_runs_where_peak_memory_cannot_be_measured(monkeypatch, capsys):
    """Where /proc/self/clear_refs cannot be written (a sandbox; not Linux), the README's first
    command still runs and says why it gives no memory figures, instead of a traceback."""
    from factorcl_ext import measure

    if "cpu" not in factorcl_ext.available_backends():
        pytest.skip("the fused CPU kernels are not built")

    def refuse():
        raise PermissionError(13, "Permission denied", "/proc/self/clear_refs")

    monkeypatch.setattr(measure, "_reset_peak_rss", refuse)
    calls = []
    assert measure.peak_extra_rss_bytes(lambda: calls.append(1)) is None and calls == [1]
    assert demo.main(["--batch", "9", "--dim", "3", "--hidden", "5", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "n/a" in out and measure.MEMORY_UNAVAILABLE in out and "fused is" in out, out
