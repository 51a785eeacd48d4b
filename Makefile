# Two commands do the whole set-up on a fresh machine:
#   make demo   - builds .venv on first use, then runs the whole chain on the CPU
#   make test   - builds .venv on first use, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pinned so every machine trains with the same kernels; override for another platform,
# e.g. make TORCH_SPEC="torch torchvision --index-url <your CPU wheel index>"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Types of the TensorRT 10 API for mypy. Installed without its dependencies: the stubs'
# wheel requires the real TensorRT wheel, which neither builds nor runs without a GPU.
# 10.8 is the oldest published; JetPack 6's TensorRT 10.3 has none of its own.
TRT_STUBS_SPEC ?= tensorrt-stubs==10.8.0.43.1
PYTEST_ARGS ?=

.PHONY: demo test test-gpu typecheck bench lint clean kernels bench-kernels

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[cpu,cloud,dev,serve]'
	$(PY) -m pip install --quiet --no-deps $(TRT_STUBS_SPEC)
	# byte-code for the project's own modules, as pip writes it for every other package:
	# where PYTHONDONTWRITEBYTECODE is set, each command would otherwise compile them anew
	$(PY) -m compileall -q roadshield roadshield_base cloud_train distill edge_runtime actuator kernels serve > /dev/null
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/roadshield demo

# The TensorRT code against the TensorRT 10 stubs first, then every test; a skip is a
# failure unless the test is marked gpu, trt or hw (tests/strict_skips.py).
test: $(VENV)/.installed
	$(PY) tests/typecheck_tensorrt.py
	ROADSHIELD_STRICT_SKIPS=1 $(PY) -m pytest $(PYTEST_ARGS)

typecheck: $(VENV)/.installed
	$(PY) tests/typecheck_tensorrt.py

# only the tests that need a CUDA device (kernel parity on every binding, torch on CUDA,
# mixed precision); each skips itself where no GPU answers
test-gpu: $(VENV)/.installed kernels
	$(PY) -m pytest -m gpu -rs $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) scripts/bench_edge.py

# CUDA kernels for the Jetson (sm_87) and sm_90, plus the host build of their shared math
kernels: $(VENV)/.installed
	$(PY) -m kernels.build

bench-kernels: $(VENV)/.installed kernels
	$(PY) scripts/bench_kernels.py

lint: $(VENV)/.installed
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
