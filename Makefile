# dicebox: `make demo` and `make test` work on a fresh Debian 12 clone; they install what
# is missing (apt packages, a .venv with torch==2.13.0) and build the C++ core first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUILD_DIR := build/dev
APT_PACKAGES := build-essential cmake ninja-build ccache libeigen3-dev libgtest-dev \
                nlohmann-json3-dev zlib1g-dev python3-venv python3-dev wrk rabbitmq-server chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export CCACHE_DIR ?= $(CURDIR)/build/ccache
# ccache caches compiles that use the precompiled header only with these relaxations.
export CCACHE_SLOPPINESS := pch_defines,time_macros,include_file_mtime,include_file_ctime

.PHONY: all deps build test test-cpp test-py demo bench clean sanitize fuzz

all: build

# System packages: installed only when one is missing.
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:" $$missing; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# Exact versions from constraints.txt (regenerated as its header says).
$(VENV)/.installed: requirements-dev.txt constraints.txt | deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt -c constraints.txt
	touch $@

# The package, built in place (editable) with a persistent build directory, so a rebuild
# after a one-file change only recompiles that file.
build: deps $(VENV)/.installed
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . \
	  -Cbuild-dir=$(BUILD_DIR) -Ccmake.define.DICEBOX_BUILD_TESTS=ON -Cbuild.verbose=false

test-cpp: build
	ctest --test-dir $(BUILD_DIR) --output-on-failure -j2

test-py: build
	$(PY) -m pytest -q tests

test: test-cpp test-py

demo: build
	$(PY) -m dicebox.demo

bench: build
	$(PY) bench/train_vs_torch.py

# The C++ core and its GoogleTest suite under AddressSanitizer + UBSan (gcc), with every fuzz
# target replaying its seed corpus and kept crashes; any finding (leaks included) fails the
# run. LibTorch is not instrumented and has needed no suppressions.
SANITIZE_DIR := build/sanitize
sanitize: export ASAN_OPTIONS = detect_leaks=1:check_initialization_order=1:strict_init_order=1
sanitize: export UBSAN_OPTIONS = halt_on_error=1:print_stacktrace=1
sanitize: deps $(VENV)/.installed
	cmake -S . -B $(SANITIZE_DIR) -G Ninja -DPython_EXECUTABLE=$(CURDIR)/$(PY) \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
	  -DDICEBOX_SANITIZE=ON -DDICEBOX_BUILD_TESTS=ON -DDICEBOX_BUILD_EXTENSION=OFF
	cmake --build $(SANITIZE_DIR) -j2
	ctest --test-dir $(SANITIZE_DIR) --output-on-failure -j2

# libFuzzer (clang) on every parser of outside bytes in the core, FUZZ_SECONDS per target,
# starting from the seed corpus; a crash fails the run and is left in $(FUZZ_DIR)/crashes.
FUZZ_DIR := build/fuzz
FUZZ_SECONDS ?= 60
FUZZ_APT_PACKAGES := clang libclang-rt-14-dev
FUZZ_TARGETS := dataset_file idx genome model_files safetensors image_buffers search_space
fuzz: deps
	@$(MAKE) --no-print-directory deps APT_PACKAGES="$(FUZZ_APT_PACKAGES)"
	cmake -S . -B $(FUZZ_DIR) -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDICEBOX_FUZZ=ON
	cmake --build $(FUZZ_DIR) -j2
	mkdir -p $(FUZZ_DIR)/crashes
	for target in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_DIR)/corpus/$$target; \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 $(FUZZ_DIR)/cpp/fuzz/fuzz_$$target \
	    -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 -artifact_prefix=$(FUZZ_DIR)/crashes/$$target- \
	    $(FUZZ_DIR)/corpus/$$target cpp/fuzz/corpus/$$target || exit 1; \
	done

clean:
	rm -rf build $(VENV)
