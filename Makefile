# Two commands set up a fresh clone: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install quickstart test lint browser docs clean

# torch first, pinned: it takes the local CPU wheel; a bare `torch` would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/petra search search_spaces/quickstart.yaml

lint: install
	$(BIN)/ruff check petra tests benchmarks

# The default run (not slow) stays under 15 minutes; CI then runs the slow tests too. Each run
# prints its 15 slowest tests, to watch that. Both run on TEST_WORKERS pytest-xdist workers: most
# tests wait on one single-threaded subprocess, so one worker leaves the second core idle.
TEST_WORKERS ?= 2
PYTEST = $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15
test: install lint browser docs
	$(PYTEST)
	$(PYTEST) -m slow

# The documentation site, built strict (a broken link or page fails it) into runs/site.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q

# The browser test drives Debian's chromium through chromedriver. Install them when missing and
# root; otherwise say loudly that the browser test will be skipped.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	  echo "browser test: $$(chromium --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "browser test: installing Debian's chromium and chromium-driver (apt)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends chromium chromium-driver >/dev/null) \
	  || echo "!!! browser test: apt-get could not install chromium; it will be SKIPPED"; \
	else \
	  echo "!!! browser test: chromium and chromedriver are missing and this is not root;" \
	       "it will be SKIPPED"; \
	fi

clean:
	rm -rf $(VENV) runs/mlflow.db runs/artifacts runs/cache
