# Developer shortcuts; the README's commands are the user-facing ones.
PY ?= python

.PHONY: install test test-gpu bench bench-large lint
install:
	pip install --no-build-isolation -e .
test:
	$(PY) -m pytest tests
test-gpu:
	$(PY) -m pytest tests -m gpu
bench:
	$(PY) benchmarks/cpu_table.py
bench-large:
	$(PY) benchmarks/cpu_table.py --large
lint:
	ruff check factorcl_ext python tests benchmarks && clang-format --dry-run -Werror csrc/*.cpp csrc/*/*.cpp csrc/*.h
