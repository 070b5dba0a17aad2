# Two commands do all set-up themselves: `make test` and `make bench`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: test bench glyphs install clean lint

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, explicitly (the CPU build on these machines' disk); then the project
# without build isolation (isolation would pull a second, multi-GB torch).
$(STAMP): $(PY) pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q setuptools wheel ninja numpy
	$(PIP) install -q --no-build-isolation -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

# the suite, then every Python example of README.md and docs/ (conftest.py gives them
# their stand-ins); two runs, so that the examples' plugin does not scan the test modules
test: $(STAMP)
	$(PY) -m pytest tests -q
	$(PY) -m pytest --markdown-docs -q README.md docs

bench: $(STAMP)
	$(PY) -m bench.bench_loss

# Every head on printed CJK characters (bench/train_glyphs.py). It needs CJK fonts:
# `make glyphs INSTALL_FONTS=1` installs Debian's with apt-get first, and only as root.
glyphs: $(STAMP)
ifeq ($(INSTALL_FONTS),1)
	@test "$$(id -u)" = 0 || { echo "INSTALL_FONTS=1: apt-get install needs root"; exit 1; }
	@command -v apt-get >/dev/null || { echo "INSTALL_FONTS=1: no apt-get here (Debian or Ubuntu)"; exit 1; }
	apt-get update && apt-get install -y $$($(PY) -m bench.glyph_data --debian-packages)
endif
	$(PY) -m bench.train_glyphs

lint: $(STAMP)
	$(PY) -m pip install -q ruff && $(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info fused_margin/*.so
