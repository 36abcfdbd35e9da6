"""Run the Triton tests on the CPU through the Triton interpreter, in their own pytest process.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated (at import), so it cannot be turned
on inside this process: each test here starts ``python -m pytest`` with ``TRITON_INTERPRET=1`` and
fails if that run fails, printing its output. Only without a GPU (with one, the same tests run in
process on the device) and only from a process that is not itself interpreted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factorcl_ext import _backends

from conftest import SESSION_SEED

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(not _backends.has_triton(), reason="needs the triton package"),
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="a GPU is present: the Triton tests run in process on it"),
    pytest.mark.skipif(_backends.triton_interpreted(),
                       reason="already interpreted: tests/test_triton.py runs in this process"),
]

# the shared backend-parametrised suites, run with the triton backend only
SHARED = ["tests/test_concat_critic.py", "tests/test_separable_critic.py", "tests/test_nn.py",
          "tests/test_random_configurations.py"]


def run_interpreted(args: list[str], extra_env: dict | None = None, timeout: int = 600) -> None:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    # the child draws the same per-test seeds as this session, so that a failure there can be
    # rerun with the FACTORCL_TEST_SEED this session's header prints
    env["FACTORCL_TEST_SEED"] = str(SESSION_SEED)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    print(output)
    # exit code 5: nothing collected, which would make this test unable to fail
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{output[-6000:]}"
    assert " passed" in output, output[-2000:]


def test_triton_suite_under_interpreter():
    run_interpreted(["tests/test_triton.py"])


def test_shared_backend_suites_under_interpreter():
    # about 2.5 min on 2 busy cores: the shared suites skip their two interpreter-hostile tests
    # for triton (numerical gradcheck, and bitwise reruns where nothing can race)
    present = [f for f in SHARED if (ROOT / f).exists()]
    if not present:
        pytest.skip(f"none of {SHARED} exists yet")
    run_interpreted([*present, "-k", "not large"], {"FACTORCL_TEST_BACKENDS": "triton"},
                    timeout=3600)
