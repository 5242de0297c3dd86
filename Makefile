# ftaas: `make serve` and `make test` set up whatever is missing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra pip options, e.g. PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"
# where the CPU build of torch is not already on the machine's package index.
PIP_EXTRA ?=
EXTRAS ?= cpu,dev
# One stamp per set of extras: `make setup EXTRAS=gpu,dev` on a venv set up for the CPU
# installs again (and replaces the CPU torch).
comma := ,
STAMP := $(VENV)/.ftaas-installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: setup serve stop test test-fast lint format clean

setup: $(STAMP)

# deploy/install.sh is also the container image's install step (deploy/Dockerfile).
$(STAMP): pyproject.toml deploy/install.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	sh deploy/install.sh $(PY) '$(EXTRAS)' $(PIP_EXTRA) -e
	rm -f $(VENV)/.ftaas-installed*
	touch $(STAMP)

serve: setup
	$(PY) -m service serve

stop: setup
	$(PY) -m service stop

# The suite runs with a new, empty HOME, as on a machine that never ran ftaas: nothing a
# developer's home holds (~/.ray, ~/.cache/huggingface, credentials) can make it pass.
# (Only the install, in `setup`, uses the machine's pip settings.)
test: setup
	@home=$$(mktemp -d) && HOME=$$home $(PY) -m pytest -m "" tests; \
	status=$$?; rm -rf "$$home"; exit $$status

test-fast: setup
	@home=$$(mktemp -d) && HOME=$$home $(PY) -m pytest -m "not integration and not e2e" tests; \
	status=$$?; rm -rf "$$home"; exit $$status

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) .ftaas .pytest_cache .ruff_cache .mypy_cache
