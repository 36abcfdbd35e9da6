# Developer shortcuts; the README's commands are the user-facing ones.
PY ?= python

.PHONY: install test test-gpu test-triton sanitize bench bench-large bench-gpu lint
install:
	pip install --no-build-isolation -e .
test:
	$(PY) -m pytest tests
test-gpu:
	$(PY) -m pytest tests -m gpu
# the Triton backend on the CPU through the interpreter (what CI runs via test_triton_interpreter)
test-triton:
	TRITON_INTERPRET=1 $(PY) -m pytest tests/test_triton.py
# the CUDA backend's GPU tests under compute-sanitizer (memcheck, racecheck, synccheck)
sanitize:
	tests/run_compute_sanitizer.sh
bench:
	$(PY) benchmarks/cpu_table.py
bench-large:
	$(PY) benchmarks/cpu_table.py --large
bench-gpu:
	$(PY) benchmarks/gpu_bench.py
# ruff over the Python sources, clang-format over csrc/ (rules: pyproject.toml, .clang-format;
# both tools pinned in requirements.txt); the suite runs the same test
lint:
	$(PY) -m pytest -q tests/test_lint.py
