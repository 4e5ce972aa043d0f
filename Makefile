# netqueues: `make demo` and `make test` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SEEDS ?= 200

.PHONY: lan-available demo test test-fast lan chaos bench lint typecheck install system-deps octoprint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# mosquitto and its clients for the end-to-end tests; iproute2 for the LAN tier (root only).
system-deps:
	@if ! command -v mosquitto >/dev/null || ! command -v mosquitto_pub >/dev/null || ! command -v ip >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients iproute2 >/dev/null; \
		else \
			echo "install mosquitto, mosquitto-clients and iproute2 (e.g. sudo apt-get install mosquitto mosquitto-clients iproute2)"; \
		fi; \
	fi

# OctoPrint cannot share our virtual environment: it gets one of its own.
octoprint:
	bash scripts/install-octoprint.sh

demo: $(STAMP)
	$(VENV)/bin/netq demo --nodes 4 --jobs 12 --until-done --kill-host

# Everything, the LAN chaos tier (-m lan: network namespaces, root) last: the quick tiers fail first. The CI set
# of fault schedules runs twice: in safety mode quorum (the default) and in safety mode available.
test: $(STAMP) system-deps octoprint
	$(PY) -m pytest -q -m "not lan"
	$(PY) -m pytest -q -m lan tests/lan
	NETQ_CHAOS_SAFETY=available $(PY) -m pytest -q -m lan tests/lan/test_chaos.py

lan: $(STAMP) system-deps
	$(PY) -m pytest -q -m lan tests/lan

# The CI set of fault schedules in safety mode available alone (also part of `make test`).
lan-available: $(STAMP) system-deps
	NETQ_CHAOS_SAFETY=available $(PY) -m pytest -q -m lan tests/lan/test_chaos.py

test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

# A long fuzzing run of tests/fuzz (hypothesis profile "fuzz": 20,000 inputs per test; `make test` runs the
# bounded "ci" profile). The count of inputs run is printed at the end.
.PHONY: fuzz
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q --timeout=0 tests/fuzz

chaos: $(STAMP) system-deps
	NETQ_CHAOS_SEEDS=$(SEEDS) $(PY) -m pytest -q tests/lan

bench: $(STAMP) system-deps
	$(PY) bench/claim_latency.py
	$(PY) bench/scheduler.py
	$(PY) bench/file_fetch.py

lint: $(STAMP)
	$(VENV)/bin/ruff check broker node shared tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy shared broker node

clean:
	rm -rf $(VENV) .octoprint-venv .pytest_cache .mypy_cache .ruff_cache .hypothesis
