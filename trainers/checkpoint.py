"""Checkpoints of the trainers: one `.npz` file, written atomically.

A checkpoint holds every model and optimizer variable (seed states
included, which Keras' weight files leave out), keyed by variable path,
the step and the history of the epochs so far. It is written to a
temporary file and renamed into place, so a kill never leaves a
half-written checkpoint, and it restores only into a model whose
variables have the same paths and shapes. Workers other than the chief
write a copy of their own beside it (`<path>.worker`).
"""

import json
import os
import tempfile

import keras
import numpy as np

CHECKPOINT = "checkpoint.npz"


def write_atomically(path, write):
    """Calls `write(file)` on a temporary file, then renames it to `path`."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _state_variables(model):
    return list(model.variables) + list(model.optimizer.variables)


def state_paths(model):
    """`{key: variable}` of every model and optimizer variable.

    A key is the variable's path; a path that occurs more than once gets
    `#k` appended to its k-th repeat (k = 1, 2, … in variable order).
    """
    keys, seen = {}, {}
    for variable in _state_variables(model):
        count = seen.get(variable.path, 0)
        seen[variable.path] = count + 1
        keys[variable.path + (f"#{count}" if count else "")] = variable
    return keys


_VARIABLES = "variables/"
_TORCH_RANDOM_STATE = "torch_random_state"


def save(path, model, step, history=None):
    """Writes the model's and optimizer's variables, keyed by path, with
    `step` and the `history` so far, to `path`, atomically.

    On PyTorch it also writes torch's CPU generator, which Keras' unseeded
    `Dropout` draws from there instead of from a seed variable (see
    `TorchRandomStream`).
    """
    arrays = {_VARIABLES + k: v.numpy() for k, v in state_paths(model).items()}
    arrays["history"] = np.array(json.dumps(history or {}))
    if keras.backend.backend() == "torch":
        import torch

        arrays[_TORCH_RANDOM_STATE] = torch.get_rng_state().numpy()
    write_atomically(path, lambda f: np.savez(f, step=np.int64(step), **arrays))


def restore(path, model):
    """Loads a checkpoint into `model`; returns its step.

    Every variable is matched by its path (`state_paths`). Variables
    missing from the checkpoint, saved ones the model lacks and shapes
    that differ are an error that lists them, and nothing is assigned.
    """
    variables = state_paths(model)
    with np.load(path) as saved:
        step = int(saved["step"])
        if "v0" in saved.files:
            raise ValueError(
                f"Checkpoint {path} keys its variables by position, as "
                "earlier versions wrote them; it cannot be matched to the "
                "model. Train afresh in another --output_dir."
            )
        arrays = {
            name[len(_VARIABLES) :]: saved[name]
            for name in saved.files
            if name.startswith(_VARIABLES)
        }
        torch_random_state = None
        if _TORCH_RANDOM_STATE in saved.files:
            torch_random_state = saved[_TORCH_RANDOM_STATE]
    problems = [f"missing {k}" for k in variables if k not in arrays]
    problems += [f"unexpected {k}" for k in arrays if k not in variables]
    problems += [
        f"{k} has shape {arrays[k].shape} in the checkpoint and "
        f"{tuple(v.shape)} in the model"
        for k, v in variables.items()
        if k in arrays and arrays[k].shape != tuple(v.shape)
    ]
    if problems:
        listed = "; ".join(problems[:20])
        if len(problems) > 20:
            listed += f"; and {len(problems) - 20} more"
        raise ValueError(
            f"Checkpoint {path} does not match the model; was it written by "
            f"another model or flag setting? {len(problems)} mismatches: "
            f"{listed}."
        )
    for key, variable in variables.items():
        variable.assign(arrays[key])
    if torch_random_state is not None and keras.backend.backend() == "torch":
        import torch

        torch.set_rng_state(torch.from_numpy(torch_random_state))
    return step


class TorchRandomStream(keras.callbacks.Callback):
    """Gives the training steps a stream of torch random numbers of their own.

    On PyTorch, Keras' unseeded `Dropout` draws from torch's global CPU
    generator, which Keras' data loaders also draw from whenever an
    iterator starts (each `fit` and `evaluate`). Setting the generator at
    every batch to where the previous batch left it takes those draws out
    of the masks' stream, so a run resumed from a checkpoint (which saves
    the generator after its step) draws the masks of an uninterrupted run.
    """

    def __init__(self):
        super().__init__()
        import torch

        self._torch = torch
        self._state = torch.get_rng_state()

    def on_train_batch_begin(self, batch, logs=None):
        self._torch.set_rng_state(self._state)

    def on_train_batch_end(self, batch, logs=None):
        self._state = self._torch.get_rng_state()

    def on_epoch_end(self, epoch, logs=None):
        # Before `AtomicCheckpoint` saves at the epoch's end: the stream as
        # the last batch left it, not as the validation data loader did.
        self._torch.set_rng_state(self._state)


def saved_history(path):
    """The training history saved with the checkpoint at `path` ({} if
    none)."""
    with np.load(path) as saved:
        if "history" not in saved.files:
            return {}
        return json.loads(str(saved["history"]))


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves `checkpoint.npz` every `every` steps and at the end of training.

    Steps are read from the optimizer's counter, so the schedule holds with
    `steps_per_execution` > 1 (the callback then runs once per execution).
    The checkpoint also holds `history`, the logs of every epoch so far
    (to which this callback appends each epoch's). A state with a
    non-finite loss or weight is never written: the last good checkpoint
    stays in place.
    """

    def __init__(self, path, every, start_step, is_chief=True, history=None):
        super().__init__()
        self.path = path
        self.every = every
        self.step = start_step
        self.saved_step = start_step
        self.is_chief = is_chief
        self.history = {} if history is None else history
        self._due = False

    def on_train_batch_end(self, batch, logs=None):
        self.step = int(self.model.optimizer.iterations.numpy())
        if self.step // self.every > self.saved_step // self.every:
            # At the epoch's last batch, wait for the epoch's logs.
            steps = (self.params or {}).get("steps")
            if steps and batch + 1 >= steps:
                self._due = True
            else:
                self._save(logs)

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        if self._due:
            self._save(logs)

    def on_train_end(self, logs=None):
        if self.step > self.saved_step:
            self._save(logs)

    def _save(self, logs):
        self._due = False
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            return
        if not all(np.all(np.isfinite(v.numpy())) for v in self.model.weights):
            return
        path = self.path if self.is_chief else self.path + ".worker"
        save(path, self.model, self.step, self.history)
        self.saved_step = self.step
