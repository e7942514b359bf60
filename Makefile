# Two commands on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
EXTRAS ?= cpu,jax,torch,dev
# KerasHub for tests/keras_hub_test.py (tiny backbones built from their
# constructors; no preset is downloaded), installed without its declared
# dependencies: keras-hub 0.32 requires tensorflow-text, which pulls the
# full `tensorflow` package over tensorflow-cpu, and kagglehub, kagglesdk
# and sentencepiece serve presets and tokenizers only. `import keras_hub`
# needs regex and tokenizers (itself without huggingface_hub). keras-hub
# needs Python 3.11+; on 3.10 it is left out and its tests are skipped.
KERAS_HUB ?= keras-hub==0.32.0 regex tokenizers

.PHONY: venv data train test lint clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	if $(PY) -c "import sys; sys.exit(sys.version_info < (3, 11))"; then \
		$(PY) -m pip install --no-deps $(KERAS_HUB); \
	else \
		echo "Python < 3.11: keras-hub left out, its tests are skipped"; \
	fi
	touch $@

data:
	@bash scripts/ensure_fashion_mnist.sh "$(FASHION_MNIST_DIR)"

train: venv data
	$(PY) -m trainers.compare_sgd_sam --data_dir=$(FASHION_MNIST_DIR)

# One pytest pass per backend: Keras fixes its backend per process. The
# JAX and PyTorch passes skip what only TensorFlow has (tf.distribute, the
# trainers' multi-worker and TPU paths). Each pass runs its test files on
# TEST_WORKERS processes (pytest-xdist; 0 runs them in this one): a test
# mostly keeps one core busy tracing and compiling small models, or waits
# on the processes it starts. A file stays on one worker, which starts its
# module fixtures once. The slowest tests are listed at the end of a pass.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

test: venv data
	$(PYTEST) tests
	KERAS_BACKEND=jax $(PYTEST) -m "not tensorflow_only" tests
	KERAS_BACKEND=torch $(PYTEST) -m "not tensorflow_only" tests

lint: venv
	$(VENV)/bin/ruff check keras_sam trainers tests benchmarks
	$(VENV)/bin/ruff format --check keras_sam trainers tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
