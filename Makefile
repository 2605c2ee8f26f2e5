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
	@echo "Results: results/all.md, figures in results/figures/. The report with them all:"
	@echo "  $(VENV)/bin/snakemake --report results/report.zip   (unzip it and open report/report.html)"
	@echo "Runs in MLflow: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///results/mlflow.db --port 5000"

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/snakemake --lint

clean-results:
	rm -rf results .snakemake
