"""Weights files of a `SAMModel` in the layout of its base model.

Keras writes a model's `.weights.h5` file by walking its attributes, so a
wrapper's file nests the base model's weights under `base/` and the bare
base model cannot read it. `SAMModel.save_weights` writes the base's
weights at the root instead, as `base.save_weights` would, and the wrapper's
own state (the optimizer, the variants' state) under `sam_model/`, a group
that the base model ignores.

This uses Keras' saving internals (`keras.src.saving.saving_lib`), the
functions that `Model.save_weights` itself calls.
"""

import os

from keras.src.saving import saving_lib
from keras.src.utils import io_utils

SAM_STATE = "sam_model"


def _store(filepath, mode, max_shard_size=None):
    if str(filepath).endswith(".weights.json") or max_shard_size is not None:
        if mode == "w":
            return saving_lib.ShardedH5IOStore(
                filepath, max_shard_size, mode=mode
            )
        return saving_lib.ShardedH5IOStore(filepath, mode=mode)
    return saving_lib.H5IOStore(filepath, mode=mode)


def save_weights(model, filepath, overwrite=True, max_shard_size=None):
    """Writes the base's weights at the root and the rest under `sam_model/`."""
    if not overwrite and os.path.exists(filepath):
        if not io_utils.ask_to_proceed_with_overwrite(filepath):
            return
    store = _store(filepath, "w", max_shard_size)
    try:
        visited = set()
        saving_lib._save_state(model.base, store, None, "", visited)
        saving_lib._save_state(model, store, None, SAM_STATE, visited)
    finally:
        store.close()


def has_sam_layout(filepath):
    """Whether `filepath` was written by `save_weights` above."""
    return has_path(filepath, SAM_STATE)


def has_path(filepath, path):
    """Whether the weights file has a group at `path`."""
    store = _store(filepath, "r")
    try:
        return store.has_path(path)
    finally:
        store.close()


def load_weights(model, filepath, skip_mismatch=False):
    """Reads a file written by `save_weights` into `model` and its base."""
    store = _store(filepath, "r")
    failed, errors = set(), {}
    try:
        visited = set()
        saving_lib._load_state(
            model.base, store, None, "", skip_mismatch, visited, failed, errors
        )
        visited.add(id(model.base))
        saving_lib._load_state(
            model,
            store,
            None,
            SAM_STATE,
            skip_mismatch,
            visited,
            failed,
            errors,
        )
    finally:
        store.close()
    if failed:
        saving_lib._raise_loading_failure(errors, warn_only=skip_mismatch)
