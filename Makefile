# Keel: two commands on a fresh machine with Python 3.11 and make.
#   make demo   install, start Temporal + PostgreSQL + a worker, run a sample request
#   make test   install and run the whole suite
#   make lint   prove the layering (import-linter), ruff, mypy
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml tests/pkgs/acme_tools/pyproject.toml | cksum | cut -d' ' -f1)
WORKERS ?= 1
# `make test` runs the suite in this many processes (pytest-xdist); each starts its own Temporal
# dev server and PostgreSQL on free ports (tests/conftest.py). Whole files go to one process
# (--dist loadfile) so a module's fixtures are built once.
TEST_PROCS ?= 2

.PHONY: install sandbox-deps demo up down status worker test test-slow lint bench bench-smoke clean

install: $(STAMP) sandbox-deps

# bubblewrap confines the sandboxed tools (activities/sandbox.py). Installed only when it is
# missing and we are root with apt-get; otherwise skipped with a note (sandboxed tools are
# then not registered, and their tests skip with the reason).
sandbox-deps:
	@command -v bwrap >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing bubblewrap (apt-get)"; \
			(apt-get install -y --no-install-recommends bubblewrap >/dev/null 2>&1 \
			 || (apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends bubblewrap >/dev/null 2>&1)) \
			|| echo "note: could not install bubblewrap; sandboxed tools stay off"; \
		else \
			echo "note: bwrap not found and not root with apt-get; sandboxed tools stay off"; \
		fi; }
$(STAMP): pyproject.toml tests/pkgs/acme_tools/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing Keel into $(VENV) (log: $(VENV)/install.log)"
	@$(BIN)/python -m pip install --upgrade pip > $(VENV)/install.log 2>&1 \
		&& $(BIN)/python -m pip install -e '.[dev,local]' >> $(VENV)/install.log 2>&1 \
		&& $(BIN)/python -m pip install --no-deps -e tests/pkgs/acme_tools >> $(VENV)/install.log 2>&1 \
		|| (tail -20 $(VENV)/install.log; echo "install failed: see $(VENV)/install.log"; exit 1)
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

up: install
	@$(BIN)/python starter.py dev up --workers $(WORKERS)

demo: up
	@$(BIN)/python starter.py run "Check if order ORD-123 is shipped and refund it if so" \
		--tenant acme --user alice --budget 0.50 --request-id demo-$$(date +%s)
	@echo
	@echo "Temporal Web UI:  http://127.0.0.1:$${KEEL_UI_PORT:-8233}"
	@echo "Try:              $(BIN)/keel --help   (or: $(BIN)/python starter.py --help)"
	@echo "Stop everything:  make down"

status: install
	@$(BIN)/python starter.py dev status

worker: install
	@$(BIN)/python worker.py

down:
	@test -x $(BIN)/python && $(BIN)/python starter.py dev down || true

test: install
	@$(BIN)/python -m pytest -n $(TEST_PROCS) --dist loadfile

# The slow fault variants (a PostgreSQL outage longer than a local activity's timeout, a frozen
# worker): minutes of waiting each, so outside `make test`'s ten-minute budget.
test-slow: install
	@$(BIN)/python -m pytest -m slow

# The layering contracts (import-linter), ruff, and mypy (strict on the core). import-linter and
# mypy read a copy of the sources in the installed layout (.keel/lint/keel/workflows, ...):
# workflows/ and activities/ sit beside keel/ in the repository, see tests/import_contracts.py.
lint: install
	@$(BIN)/python -m tests.import_contracts
	@$(BIN)/ruff check .
	@$(BIN)/ruff format --check .
	@cd .keel/lint && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml --cache-dir $(CURDIR)/.keel/mypy-cache -p keel

bench: install
	@$(BIN)/python -m pip install -e '.[bench]' >> $(VENV)/install.log 2>&1 \
		|| (tail -20 $(VENV)/install.log; echo "bench install failed"; exit 1)
	@$(BIN)/python bench/run.py

bench-smoke: install
	@$(BIN)/python bench/run.py --smoke --out /tmp/keel-bench-smoke.md

clean: down
	rm -rf .keel $(VENV) *.egg-info
