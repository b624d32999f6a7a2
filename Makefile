# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
export PATH := $(HOME)/.local/bin:$(PATH)
PY := .venv/bin/python
# Ray must not rebuild the environment from project metadata in its workers (see ../shared/guide/environment.md).
export RAY_ENABLE_UV_RUN_RUNTIME_ENV := 0

.PHONY: install demo test lint format bench bench-match bench-nightly bench-evaluate clean

install:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	@if command -v uv >/dev/null 2>&1; then uv sync --locked; else python3 -m uv sync --locked; fi

demo: install
	bash scripts/demo.sh

test: install
	$(PY) -m pytest -q

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

format: install
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

bench: install
	$(PY) scripts/bench_ingest.py

bench-match: install
	@if command -v uv >/dev/null 2>&1; then uv sync --locked --group bench; else python3 -m uv sync --locked --group bench; fi
	$(PY) scripts/bench_match.py

bench-nightly: install
	$(PY) scripts/bench_nightly.py

# Times `gallerymatch evaluate` on ~1,500 generated face photos (two real people: timing only) with the trained
# facenet-casia-webface weights, installed first into a temporary models dir unless GALLERYMATCH_MODELS_DIR is set.
bench-evaluate: install
	$(PY) scripts/bench_evaluate.py

clean:
	rm -rf .gallerymatch demo-data .pytest_cache .mypy_cache .ruff_cache
