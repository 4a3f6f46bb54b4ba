# Everything runs inside a local virtual environment (.venv) with torch pinned to 2.13.0 (CPU build).
#   make demo   install if needed, then compare generation with and without SDTM on a tiny SD3 pipeline
#   make test   install if needed, then run the test suite
# requirements.txt pins the optional extras too (triton, test, and cache: cache-dit for --cache cache-dit),
# so `make install` (and CI, which runs `make test`) has them all.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sdtm-installed
SOURCES := $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h) setup.py pyproject.toml requirements.txt

.PHONY: demo test install bench cmake-build clean

demo: install
	$(BIN)/python -m sdtm demo

test: install
	$(BIN)/python -m pytest tests -q

bench: install
	$(BIN)/python -m pytest benchmarks --benchmark-only

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

# The same sources built by CMake against the installed torch (a shared library loadable with
# torch.ops.load_library), then smoke-tested in a fresh process.
cmake-build: install
	cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DPython3_EXECUTABLE="$$(pwd)/$(BIN)/python"
	cmake --build build-cmake -j 2
	$(BIN)/python tests/cmake_smoke.py build-cmake

clean:
	rm -rf build build-cmake *.egg-info sdtm/_C*.so
