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

.PHONY: all deps build test test-cpp test-py demo bench clean

all: build

# System packages: installed only when one is missing.
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:" $$missing; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: requirements-dev.txt | deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
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

clean:
	rm -rf build $(VENV)
