"""setup.py's build decisions and the source distribution, without compiling anything: when the
CUDA extension is built (nvcc present and of torch's CUDA major version), how many compile jobs
run, that an sdist carries every header the sources include; and what an install whose compiled
extension does not load says (the package, and this test suite)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py as a module, its setup() call a no-op (FACTORCL_EXT_CUDA=0: nothing probed)."""
    import importlib.util

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setenv("FACTORCL_EXT_CUDA", "0")
    spec = importlib.util.spec_from_file_location("factorcl_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.delenv("FACTORCL_EXT_CUDA")
    return mod


def _fake_cuda_home(tmp_path, release: str | None) -> str:
    home = tmp_path / f"cuda-{release}"
    (home / "bin").mkdir(parents=True)
    if release is not None:
        nvcc = home / "bin" / "nvcc"
        nvcc.write_text("#!/bin/sh\n"
                        f"echo 'Cuda compilation tools, release {release}, V{release}.0'\n")
        nvcc.chmod(0o755)
    return str(home)


def test_cuda_is_built_only_with_an_nvcc_of_torchs_cuda_major(setup_py, tmp_path,
                                                              monkeypatch, capsys):
    # a runtime-only CUDA install (no nvcc) or an nvcc of another major version made the default
    # build announce "building the CPU and CUDA extension" and then fail; FACTORCL_EXT_CUDA=1 now
    # refuses before compiling, the default builds the CPU extension and says why
    monkeypatch.setattr(setup_py.torch.version, "cuda", "13.0")
    monkeypatch.setattr(setup_py.glob, "glob", lambda pattern: ["kernel.cu"])
    cases = {None: "has no bin/nvcc (a runtime-only CUDA install?)",
             "12.4": "is CUDA 12.4, torch was built with CUDA 13.0 (the major versions must match)"}
    for release, why in cases.items():
        monkeypatch.setattr(setup_py, "CUDA_HOME", _fake_cuda_home(tmp_path, release))
        monkeypatch.delenv("FACTORCL_EXT_CUDA", raising=False)
        assert setup_py._want_cuda() is False
        err = capsys.readouterr().err
        assert "building the CPU extension only" in err and why in err, err
        monkeypatch.setenv("FACTORCL_EXT_CUDA", "1")
        with pytest.raises(SystemExit, match="FACTORCL_EXT_CUDA=1 but the CUDA extension cannot "
                                             "be built: .*" + why.split(" (")[0]):
            setup_py._want_cuda()
    monkeypatch.setattr(setup_py, "CUDA_HOME", _fake_cuda_home(tmp_path, "13.1"))
    for flag in ("", "1"):
        monkeypatch.setenv("FACTORCL_EXT_CUDA", flag)
        assert setup_py._want_cuda() is True
    monkeypatch.setattr(setup_py.torch.version, "cuda", None)  # a CPU build of torch
    monkeypatch.setenv("FACTORCL_EXT_CUDA", "")
    assert setup_py._want_cuda() is False
    assert "torch is a CPU-only build" in capsys.readouterr().err


def test_default_compile_jobs_count_reclaimable_memory(setup_py, monkeypatch):
    # MemFree leaves out the file cache the kernel reclaims at once: after ordinary file I/O it
    # read 2.9 GB where 22.7 GB were available, and the CUDA build ran one nvcc at a time
    real_open = open

    def meminfo(path, *args, **kw):
        if path == "/proc/meminfo":
            import io

            return io.StringIO("MemTotal: 25000000 kB\nMemFree: 3000000 kB\n"
                               "MemAvailable: 23000000 kB\n")
        return real_open(path, *args, **kw)

    monkeypatch.setattr("builtins.open", meminfo)
    assert setup_py._available_memory_gb() == pytest.approx(23e6 / 2**20)
    monkeypatch.delenv("MAX_JOBS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    setup_py._default_max_jobs()
    assert os.environ["MAX_JOBS"] == "10"  # 21.9 GB at 2 GB a job, below the 16 CPUs
    monkeypatch.setenv("MAX_JOBS", "3")  # the user's value stands
    setup_py._default_max_jobs()
    assert os.environ["MAX_JOBS"] == "3"


def test_source_distribution_carries_every_header(tmp_path):
    # without MANIFEST.in the sdist held only the sources setup.py lists (none of csrc's headers,
    # and no CUDA sources when made with FACTORCL_EXT_CUDA=0): a wheel built from it failed with
    # "../factorcl_ext.h: No such file or directory"
    env = dict(os.environ, FACTORCL_EXT_CUDA="0")
    # its egg-info in tmp_path: the checkout's (of the editable install) stays as it is
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base",
                           str(tmp_path), "sdist", "-d", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
              if p.suffix in (".h", ".cuh", ".cpp", ".cu")}
    assert "csrc/factorcl_ext.h" in wanted and any(w.endswith(".cuh") for w in wanted)
    assert not wanted - names, sorted(wanted - names)
    assert {"setup.py", "pyproject.toml", "README.md", "requirements.txt",
            "factorcl_ext/triton/_mlp_kernels.py", "python/factorcl/cli.py"} <= names



def _without_extension(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter in which factorcl_ext._C cannot be imported."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python")]))
    env.pop("FACTORCL_TEST_BACKENDS", None)
    env.update(env_extra or {})
    prelude = "import sys; sys.modules['factorcl_ext._C'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_an_install_without_its_compiled_extension_says_so():
    # the import fell back to the reference silently: backend="auto" ran the N x M x H
    # materialising critic and nothing said why it was slow
    proc = _without_extension(
        "import warnings; warnings.simplefilter('error')\n"
        "try:\n    import factorcl_ext\nexcept RuntimeWarning as w:\n    print('WARNED', w)\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WARNED factorcl_ext: the compiled extension did not load" in proc.stdout, proc.stdout
    assert "falls back to the materialising 'reference'" in proc.stdout
    assert "pip install --no-build-isolation -e ." in proc.stdout
    proc = _without_extension(
        "import warnings; warnings.simplefilter('ignore')\nimport torch, factorcl_ext\n"
        "print(factorcl_ext.build_info()['cpu_kernels'], factorcl_ext._backends.resolve("
        "'auto', torch.device('cpu')))\n")
    assert proc.stdout.split() == ["False", "reference"], proc.stdout + proc.stderr[-2000:]


def test_the_test_suite_refuses_to_run_without_the_compiled_extension():
    # every backend-parametrised test skipped and the run passed, having tested no kernel
    run = "import pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', " \
          "'tests/test_lint.py', '-W', 'ignore::RuntimeWarning']))\n"
    proc = _without_extension(run)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]  # a usage error
    assert "factorcl_ext's compiled extension is not available here" in proc.stderr + proc.stdout
    proc = _without_extension(run, {"FACTORCL_TEST_BACKENDS": "reference"})  # asked for
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
