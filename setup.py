"""Packaging for keras_sam: the library and its absl trainers."""

import setuptools

TENSORFLOW = "2.21.*"
JAX = "jax>=0.4.36"
# Pinned: this project's machines hold torch 2.13.0's CPU build as a local
# wheel (pip's find-links), and any other version, or a bare "torch",
# resolves to a multi-GB CUDA build. Elsewhere pip takes 2.13.0 from PyPI
# (its CUDA build on Linux; for the CPU one add --extra-index-url
# https://download.pytorch.org/whl/cpu).
TORCH = "torch==2.13.0"

setuptools.setup(
    name="keras_sam",
    version="0.1.0",
    description="Sharpness-Aware Minimization (SAM, ASAM) for Keras 3.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["keras_sam*", "trainers*"]),
    python_requires=">=3.10",
    install_requires=[
        # keras_sam.compat overrides private Keras code checked against
        # 3.15.1; 3.10 to 3.14 fail its tests: there, weights
        # files fail on `H5IOStore.has_path`, and `compat.stateful_variables`
        # reads `seed_generator.GLOBAL_SEED_GENERATOR` (3.13+).
        "keras>=3.15.1,<4",
        "absl-py>=2.1",
        "tensorflow-datasets>=4.9",
        "tensorboard>=2.16",
        "numpy>=1.26",
    ],
    extras_require={
        # TensorFlow ships as two distributions; pick the one for the machine.
        "cpu": [f"tensorflow-cpu=={TENSORFLOW}"],
        "gpu": [f"tensorflow[and-cuda]=={TENSORFLOW}"],
        "tpu": [f"tensorflow-tpu=={TENSORFLOW}"],
        # Keras' JAX backend on CPU; for GPUs install "jax[cuda12]", for
        # TPUs "jax[tpu]" (see the README's Backends section).
        "jax": [JAX],
        # Keras' PyTorch backend (KERAS_BACKEND=torch).
        "torch": [TORCH],
        # keras-hub (tests/keras_hub_test.py) is no extra: it requires
        # tensorflow-text, which pulls the full `tensorflow` over
        # tensorflow-cpu. The Makefile's venv step installs it with
        # --no-deps and the two packages its import needs.
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "matplotlib>=3.8",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
