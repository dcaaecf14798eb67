# `make test` and `make demo` work on a fresh Debian 12 machine as root: they install what is
# missing first (scripts/bootstrap.sh: apt packages and the .venv).
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: test demo bootstrap lint typecheck unit integration format bench clean

test: bootstrap lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

demo: bootstrap
	$(BIN)/packit-broker demo

bootstrap:
	@bash scripts/bootstrap.sh

lint: bootstrap
	$(BIN)/ruff check packit_broker tests bench
	$(BIN)/ruff format --check packit_broker tests bench

typecheck: bootstrap
	$(BIN)/mypy packit_broker

unit: bootstrap
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: bootstrap
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

format: bootstrap
	$(BIN)/ruff format packit_broker tests bench
	$(BIN)/ruff check --fix packit_broker tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

# The README's Quick start on a brand-new Debian root, as root (RELEASE=bookworm|trixie).
.PHONY: fresh-debian
fresh-debian:
	bash scripts/fresh-debian.sh $(if $(RELEASE),--release $(RELEASE))
