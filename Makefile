# Two commands set everything up: `make demo` and `make test`.
# Both create (or reuse) .venv; torch 2.13.0 is installed first so pip takes the local CPU wheel
# instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test docs bench screenshots clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q --hypothesis-profile=ci --durations=15

# The documentation site (Sphinx, pages in Markdown, the API from the docstrings) into build/docs; warnings fail it.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs build/docs
	@echo "open build/docs/index.html"

# Trains a small model with both callbacks, opens its logs in a real TensorBoard and headless Chromium
# (installed with apt-get if missing), and saves docs/tensorboard_<tab>.png.
screenshots: $(STAMP)
	$(PY) docs/screenshots.py

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache build
