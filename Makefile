# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv sysdeps test lint demo clean

# Meta-World renders through EGL; on a bare Debian/Ubuntu machine Mesa's EGL must be installed.
sysdeps:
	@bash scripts/ensure_egl.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[sim,dev]"
	@touch $(STAMP)

venv: $(STAMP)

test: venv sysdeps
	MUJOCO_GL=egl $(PY) -m pytest -x tests

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

demo: venv sysdeps
	MUJOCO_GL=egl $(PY) -m damvla.demo

clean:
	rm -rf $(VENV) build *.egg-info
