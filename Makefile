# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
export PATH := $(HOME)/.local/bin:$(PATH)
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PY := .venv/bin/python
# Ray must not rebuild the environment from project metadata in its workers (see ../shared/guide/environment.md).
export RAY_ENABLE_UV_RUN_RUNTIME_ENV := 0

.PHONY: install demo test lint format bench clean

$(UV):
	python3 -m pip install --user --quiet uv || python3 -m pip install --quiet uv

install: $(UV)
	$(UV) sync --locked

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

clean:
	rm -rf .gallerymatch demo-data .pytest_cache .mypy_cache .ruff_cache
