# Convenience for those who prefer make; ./dev is the entry point (it needs no make).
PYTEST_ARGS ?=

.PHONY: test demo bootstrap lint typecheck unit integration format bench clean

test:
	./dev test $(PYTEST_ARGS)

demo:
	./dev demo

bootstrap:
	bash scripts/bootstrap.sh test

lint:
	./dev lint

typecheck:
	./dev typecheck

unit:
	./dev unit $(PYTEST_ARGS)

integration:
	./dev integration $(PYTEST_ARGS)

format:
	./dev format

bench:
	./dev bench

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

# The README's Quick start on a brand-new Debian root, as root (RELEASE=bookworm|trixie).
.PHONY: fresh-debian
fresh-debian:
	bash scripts/fresh-debian.sh $(if $(RELEASE),--release $(RELEASE))
