# The two commands of the README, and their steps.
#   make demo   build into .venv and run the demo (speed and recall against dense)
#   make test   build into .venv and run the test suites (pytest + the C++ test)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# nvcc's toolkit folder (torch's own guess is wrong when only the compiler is installed).
NVCC := $(shell command -v nvcc 2>/dev/null)
CUDA_HOME ?= $(if $(NVCC),$(patsubst %/bin/nvcc,%,$(realpath $(NVCC))),)
export CUDA_HOME
export MAX_JOBS ?= $(shell nproc)

.PHONY: demo test install venv pytest cpp-test clean

venv: $(VENV)/.installed
$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: venv
	@echo "CUDA_HOME=$(CUDA_HOME)"
	$(PY) -m pip install -q --no-build-isolation -e . -v 2>&1 | grep -E "anchor_ext|error|Error|\[[0-9]+/[0-9]+\]" || true
	$(PY) -c "import anchor_ext; print('anchor_ext built, CUDA kernels:', anchor_ext.built_with_cuda())"

demo: install
	$(PY) -m anchor_ext.demo $(ARGS)

pytest: install
	$(PY) -m pytest -q tests $(ARGS)

cpp-test: venv
	PATH=$(abspath $(VENV))/bin:$$PATH cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY))
	PATH=$(abspath $(VENV))/bin:$$PATH cmake --build build/cmake -j $(MAX_JOBS)
	ctest --test-dir build/cmake --output-on-failure

test: pytest cpp-test

clean:
	rm -rf build anchor_ext/*.so *.egg-info
