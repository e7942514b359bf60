# Two commands on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
EXTRAS ?= cpu,jax,torch,dev

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

# One pytest process per backend: Keras fixes its backend per process. The
# JAX and PyTorch passes skip what only TensorFlow has (tf.distribute, the
# trainers' multi-worker and TPU paths).
test: venv data
	$(PY) -m pytest tests
	KERAS_BACKEND=jax $(PY) -m pytest -m "not tensorflow_only" tests
	KERAS_BACKEND=torch $(PY) -m pytest -m "not tensorflow_only" tests

lint: venv
	$(VENV)/bin/ruff check keras_sam trainers tests benchmarks
	$(VENV)/bin/ruff format --check keras_sam trainers tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
