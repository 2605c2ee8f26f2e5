# The README's two commands: `make run` (the main job) and `make test` (the test suite).
# Both create or refresh the virtual environment at .venv with the pinned dependencies first.

PYTHON ?= python3.11
VENV := .venv
CORES ?= all

.PHONY: run test lint clean-results

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --constraint requirements.lock --editable '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/snakemake --workflow-profile workflow/profiles/default --cores $(CORES) results/all.tsv

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/snakemake --lint

clean-results:
	rm -rf results .snakemake
