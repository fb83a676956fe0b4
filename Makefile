# Two entry points, both self-contained on a clean clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A CPU build of torch. On this project's machines the wheel lies on disk; elsewhere pip
# downloads it. Override (e.g. TORCH=torch for a CUDA build) when you want another one.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: venv
	$(BIN)/fedsec simulate

test: venv
	$(BIN)/python -m pytest -n 2

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy secagg fl_core clients server proofs

clean:
	rm -rf $(VENV) build *.egg-info runs
