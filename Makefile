# Two commands on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
EXTRAS ?= cpu,dev

.PHONY: venv data train test lint bench clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	touch $@

data:
	@bash scripts/ensure_fashion_mnist.sh "$(FASHION_MNIST_DIR)"

train: venv data
	$(PY) -m trainers.compare_sgd_sam --data_dir=$(FASHION_MNIST_DIR)

test: venv data
	$(PY) -m pytest tests

lint: venv
	$(VENV)/bin/ruff check keras_sam trainers tests benchmarks
	$(VENV)/bin/ruff format --check keras_sam trainers tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
