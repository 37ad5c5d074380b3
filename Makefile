# The two commands of the README. Each sets itself up (venv, torch, build) and does nothing
# twice: the venv and its packages are stamped, and the build reruns only when csrc/ changes.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.stamp-deps
BUILT  := $(VENV)/.stamp-build
SOURCES := setup.py $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \))
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: all build test bench lint cmake-test clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch 2.14.1 (a CUDA build) takes about 5.6 GB in the venv, plus room to unpack it: warn early
# when the disk is short instead of leaving only pip's "No space left on device".
$(DEPS): requirements-dev.txt | $(PY)
	@free_kb=$$(df -Pk $(VENV) | awk 'NR==2 {print $$4}'); \
	if [ -n "$$free_kb" ] && [ "$$free_kb" -lt 8000000 ]; then \
	  echo "make: warning: $$((free_kb / 1024)) MB free where $(VENV) lives; installing torch needs about 8 GB" >&2; \
	fi
	$(PY) -m pip install --quiet --no-cache-dir -r requirements-dev.txt
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

# The tests whose results depend on the CPU kernel build run again under each build below the
# one this CPU picks (BN_EXT_CPU_ISA caps it), so every build is checked whatever CPU runs CI.
ISA_TESTS ?= tests/test_numerics.py tests/test_parity.py tests/test_act.py
ISA_BUILD = $(PY) -c 'import bn_ext; print(bn_ext.build_info()["cpu_kernels"])'

test: $(BUILT)
	$(PY) -m pytest $(PYTEST_ARGS)
	@native=$$($(ISA_BUILD)); \
	for isa in avx2 default; do \
	  got=$$(BN_EXT_CPU_ISA=$$isa $(ISA_BUILD)); \
	  if [ "$$got" = "$$isa" ] && [ "$$got" != "$$native" ]; then \
	    echo "== CPU kernels: $$isa (this CPU picks $$native)"; \
	    BN_EXT_CPU_ISA=$$isa $(PY) -m pytest -q $(ISA_TESTS) || exit 1; \
	  fi; \
	done

bench: $(BUILT)
	$(PY) -m bn_ext.bench $(BENCH_ARGS)

# Style: Python with ruff (settings in pyproject.toml), C++/CUDA with clang-format (.clang-format).
# Needs no build.
CXX_SOURCES = $(shell git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh' 'tests/cpp/*.cpp' 2>/dev/null)
lint: $(DEPS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

# The CMake build of the ops for C++ users, and its C++ test. TORCH_PREFIX defaults to the venv's
# torch; with a CUDA build of torch, Torch's CMake config needs a complete CUDA toolkit.
TORCH_PREFIX ?= $(shell $(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null)
CMAKE_ARGS ?=
cmake-test: $(DEPS)
	cmake -S . -B build-cmake -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" $(CMAKE_ARGS)
	cmake --build build-cmake -j2
	ctest --test-dir build-cmake --output-on-failure

clean:
	rm -rf build build-cmake bn_ext/*.so $(BUILT)
