"""Checkpoints of the trainers: one `.npz` file, written atomically.

A checkpoint holds every model and optimizer variable (seed states
included, which Keras' weight files leave out), keyed by variable path,
the step, the history of the epochs so far, the settings of the run that
wrote it, the running metrics of an epoch it cuts in two, and a SHA-256
checksum of all of these. It is written to a temporary file and renamed
into place, so a kill never leaves a half-written checkpoint; the one it
replaces is kept as `<path>.previous`, and `find` falls back to it when
the newest fails its checksum. It restores only into a model whose
variables have the same paths and shapes. Workers other than the chief
write a copy of their own beside it (`<path>.worker`).

Files are created with the process' umask, as any other file.
"""

import dataclasses
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import sys

import keras
import numpy as np

from keras_sam import backend

CHECKPOINT = "checkpoint.npz"
PREVIOUS = ".previous"  # suffix of the checkpoint kept before the newest
TMP_PREFIX = ".tmp-"  # of the files being written


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that belongs to another run."""


def write_atomically(path, write, keep_previous=False):
    """Calls `write(file)` on a temporary file, then renames it to `path`.

    The temporary file, `.tmp-<name of path>-<random>` beside `path`, is
    created with mode 0666 less the umask and synced to disk before the
    rename; it is removed if `write` fails. With `keep_previous`, an
    existing `path` is first renamed to `path + PREVIOUS`, so at every
    moment one of the two is a complete file.
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(
        directory,
        f"{TMP_PREFIX}{os.path.basename(path)}-{os.urandom(4).hex()}",
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.exists(path):
            os.replace(path, path + PREVIOUS)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _sync_directory(directory)


def write_text(path, text):
    """Writes `text` to `path` (UTF-8) with `write_atomically`."""
    write_atomically(path, lambda f: f.write(text.encode()))


def write_json(path, value, indent=1, sort_keys=False):
    """Writes `value` to `path` as JSON with `write_atomically`.

    A float that is not finite (an accuracy on no examples, a loss that
    diverged) is written as null: JSON has no NaN, and strict readers
    (`jq`, JavaScript) refuse Python's `NaN`.
    """
    text = json.dumps(
        _finite_or_none(value),
        indent=indent,
        sort_keys=sort_keys,
        allow_nan=False,
    )
    write_text(path, text + "\n")


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _sync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_writes(directory, name):
    """Removes the temporary files that an interrupted write of `name` (a
    file in `directory`) left; returns their paths."""
    stale = glob.glob(
        os.path.join(glob.escape(directory), f"{TMP_PREFIX}{name}-*")
    )
    for path in stale:
        os.remove(path)
    return stale


def readable_here(variables):
    """Whether this process can read every variable's whole value: false
    on JAX when one is split over several processes' devices."""
    return keras.backend.backend() != "jax" or all(
        v.value.is_fully_addressable or v.value.is_fully_replicated
        for v in variables
    )


def _value(variable):
    """The variable's whole value as a NumPy array. On JAX, a value split
    over several processes' devices is gathered, a collective every
    process must call in the same order."""
    if readable_here([variable]):
        return variable.numpy()
    from jax.experimental import multihost_utils

    return np.asarray(
        multihost_utils.process_allgather(variable.value, tiled=True)
    )


def _state_variables(model):
    return list(model.variables) + list(model.optimizer.variables)


def state_paths(model):
    """`{key: variable}` of every model and optimizer variable.

    A key is the variable's path; a path that occurs more than once gets
    `#k` appended to its k-th repeat (k = 1, 2, … in variable order).
    """
    return _keyed(_state_variables(model))


_VARIABLES = "variables/"
_METRICS = "metrics/"
_RANDOM_STATE = "random_state/"  # then the index of the state's leaf
# What checkpoints of PyTorch runs held before `_RANDOM_STATE`: torch's CPU
# generator, the first leaf of `backend.random_state()`.
_TORCH_RANDOM_STATE = "torch_random_state"
_CHECKSUM = "checksum"


def _keyed(variables):
    keys, seen = {}, {}
    for variable in variables:
        count = seen.get(variable.path, 0)
        seen[variable.path] = count + 1
        keys[variable.path + (f"#{count}" if count else "")] = variable
    return keys


def metric_paths(model):
    """`{key: variable}` of the model's metric variables (running sums
    and counts), keyed as `state_paths`."""
    return _keyed(model.metrics_variables)


def _checksum(arrays):
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save(path, model, step, history=None, settings=None, metrics=False):
    """Writes the model's and optimizer's variables, keyed by path, with
    `step`, the `history` so far, the run's `settings` (a JSON-able dict)
    and, with `metrics`, the model's metric variables, to `path`,
    atomically, keeping the checkpoint it replaces as `path + PREVIOUS`.

    It also writes the backend's global random state
    (`keras_sam.backend.random_state`: torch's generators, which Keras'
    unseeded `Dropout` draws from on PyTorch instead of from a seed
    variable; see `RandomStream`), where there is one. With `path` None it
    writes nothing but gathers the values as a process that writes does
    (JAX, `_value`).
    """
    arrays = {_VARIABLES + k: _value(v) for k, v in state_paths(model).items()}
    if metrics:
        arrays.update(
            {_METRICS + k: _value(v) for k, v in metric_paths(model).items()}
        )
    arrays["step"] = np.int64(step)
    arrays["history"] = np.array(json.dumps(history or {}))
    arrays["settings"] = np.array(json.dumps(settings or {}))
    arrays.update(
        {
            f"{_RANDOM_STATE}{i}": np.asarray(leaf)
            for i, leaf in enumerate(keras.tree.flatten(backend.random_state()))
            if leaf is not None
        }
    )
    if path is None:
        return
    arrays[_CHECKSUM] = np.array(_checksum(arrays))
    write_atomically(path, lambda f: np.savez(f, **arrays), keep_previous=True)


@dataclasses.dataclass
class Saved:
    """A checkpoint as read by `read`.

    Attributes:
        path: the file.
        step: the batches trained (a loss-scale optimizer may have skipped
            some of its steps).
        variables: `{key: array}` of `state_paths`.
        metrics: `{key: array}` of `metric_paths` (empty unless the
            checkpoint cut an epoch in two).
        history: the logs of every finished epoch.
        settings: the settings of the run that wrote it (None: written
            before checkpoints held them).
        random_state: `{index: array}` of the leaves of
            `keras_sam.backend.random_state()` when it was written (empty
            where the backend has none).
    """

    path: str
    step: int
    variables: dict
    metrics: dict
    history: dict
    settings: dict
    random_state: dict = dataclasses.field(default_factory=dict)


def read(path):
    """Reads and verifies the checkpoint at `path`.

    Every array is read in full (so the zip's CRC-32 of each is checked)
    and the checksum written with them is recomputed. Raises
    `CheckpointError` naming `path` and the fault if anything fails.
    """
    try:
        with np.load(path) as saved:
            arrays = {name: saved[name] for name in saved.files}
    except Exception as error:
        raise CheckpointError(
            f"Checkpoint {path} is corrupt and cannot be read "
            f"({type(error).__name__}: {error})"
        ) from None
    if "v0" in arrays:
        raise CheckpointError(
            f"Checkpoint {path} keys its variables by position, as "
            "earlier versions wrote them; it cannot be matched to the "
            "model. Train afresh in another --output_dir."
        )
    if _CHECKSUM in arrays:
        written = str(arrays.pop(_CHECKSUM))
        if _checksum(arrays) != written:
            raise CheckpointError(
                f"Checkpoint {path} is corrupt: its contents do not match "
                "the checksum written with them"
            )
    if _TORCH_RANDOM_STATE in arrays:
        arrays[_RANDOM_STATE + "0"] = arrays.pop(_TORCH_RANDOM_STATE)
    try:
        settings = arrays.get("settings")
        return Saved(
            path=path,
            step=int(arrays["step"]),
            variables={
                k[len(_VARIABLES) :]: v
                for k, v in arrays.items()
                if k.startswith(_VARIABLES)
            },
            metrics={
                k[len(_METRICS) :]: v
                for k, v in arrays.items()
                if k.startswith(_METRICS)
            },
            history=json.loads(str(arrays.get("history", "{}"))),
            settings=None if settings is None else json.loads(str(settings)),
            random_state={
                int(k[len(_RANDOM_STATE) :]): v
                for k, v in arrays.items()
                if k.startswith(_RANDOM_STATE)
            },
        )
    except (KeyError, ValueError) as error:
        raise CheckpointError(
            f"Checkpoint {path} is corrupt: {type(error).__name__}: {error}"
        ) from None


def find(path):
    """The newest good checkpoint of `path`: `path` itself, else the one
    kept before it (`path + PREVIOUS`); None when neither exists.

    A checkpoint that fails `read` is skipped with a warning on stderr
    naming it; when every existing one fails, raises `CheckpointError`
    listing them.
    """
    faults = []
    for candidate in (path, path + PREVIOUS):
        if not os.path.exists(candidate):
            continue
        try:
            saved = read(candidate)
        except CheckpointError as error:
            faults.append(str(error))
            continue
        for fault in faults:
            print(
                f"Warning: {fault}; resuming from {candidate} (step "
                f"{saved.step}) instead.",
                file=sys.stderr,
            )
        return saved
    if faults:
        directory = os.path.dirname(path) or "."
        raise CheckpointError(
            f"No usable checkpoint in {directory}: "
            + "; ".join(faults)
            + ". Move them away to train afresh in this --output_dir, or "
            "use another --output_dir."
        )
    return None


CORRUPT = ".corrupt"  # suffix of a checkpoint that failed its check


def set_aside(path):
    """Renames a checkpoint that failed its check to `path + CORRUPT`, for
    a look, and says so on stderr."""
    if os.path.exists(path):
        os.replace(path, path + CORRUPT)
        _sync_directory(os.path.dirname(path) or ".")
        print(f"Moved the corrupt {path} to {path + CORRUPT}.", file=sys.stderr)


def restore(saved, model):
    """Loads a checkpoint (a `Saved` or a path) into `model`; returns its
    step.

    Every variable is matched by its path (`state_paths`). Variables
    missing from the checkpoint, saved ones the model lacks and shapes
    that differ are an error that lists them, and nothing is assigned.
    """
    if not isinstance(saved, Saved):
        saved = read(saved)
    variables = state_paths(model)
    path, arrays = saved.path, _state_renamed(saved.variables, variables)
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
        raise CheckpointError(
            f"Checkpoint {path} does not match the model; was it written by "
            f"another model or flag setting? {len(problems)} mismatches: "
            f"{listed}."
        )
    for key, variable in variables.items():
        variable.assign(arrays[key])
    _restore_random_state(saved.random_state)
    return saved.step


# Before each entry of a variant's state (LookSAM's directions, F-SAM's
# averages) had a name of its own, they shared one path, keyed as repeats:
# `<path>`, `<path>#1`, ...; now `<path>_0`, `<path>_1`, ...
_SHARED_STATE = re.compile(
    r"(.*/(?:looksam_direction|friendly_average))(?:#(\d+))?"
)


def _state_renamed(arrays, variables):
    """`arrays` with each key of a shared-path entry that `variables` lacks
    renamed to the entry's own path, where `variables` has that (a user's
    variable of the same name keeps its key)."""
    renamed = {}
    for key, value in arrays.items():
        match = _SHARED_STATE.fullmatch(key)
        if match and key not in variables:
            own = f"{match[1]}_{match[2] or 0}"
            key = own if own in variables else key
        renamed[key] = value
    return renamed


def _restore_random_state(leaves):
    """Sets the leaves of `backend.random_state()` that a checkpoint holds
    (`{index: array}`); the others (a GPU's generator the run that wrote it
    did not use) keep their values."""
    state = backend.random_state()
    if state is None or not leaves:
        return
    current = keras.tree.flatten(state)
    restored = [
        leaf if leaf is None else leaves.get(i, leaf)
        for i, leaf in enumerate(current)
    ]
    backend.set_random_state(keras.tree.pack_sequence_as(state, restored))


class RandomStream(keras.callbacks.Callback):
    """Gives the training steps a stream of random numbers of their own.

    On PyTorch, Keras' unseeded `Dropout` draws from torch's global
    generators (`keras_sam.backend.random_state`), which Keras' data loaders
    also draw from whenever an iterator starts (each `fit` and `evaluate`).
    Setting the state at every batch to where the previous batch left it
    takes those draws out of the masks' stream, so a run resumed from a
    checkpoint (which saves the state after its step) draws the masks of an
    uninterrupted run. Where the backend has no global state (every draw
    through Keras' seed variables) it does nothing.
    """

    def __init__(self):
        super().__init__()
        self._state = backend.random_state()

    def on_train_batch_begin(self, batch, logs=None):
        if self._state is not None:
            backend.set_random_state(self._state)

    def on_train_batch_end(self, batch, logs=None):
        self._state = backend.random_state()

    def on_epoch_end(self, epoch, logs=None):
        # Before `AtomicCheckpoint` saves at the epoch's end: the stream as
        # the last batch left it, not as the validation data loader did.
        if self._state is not None:
            backend.set_random_state(self._state)


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves `checkpoint.npz` every `every` steps and at the end of training.

    A step is a batch trained: counted from the batch index, not from the
    optimizer's counter, which a loss-scale optimizer does not advance on
    the steps it skips (an overflow); the schedule holds with
    `steps_per_execution` > 1 (the callback then runs once per execution,
    with the execution's last batch). `fit` may end between two saves: the
    end of training is `last_step`.
    The checkpoint also holds `history`, the logs of every epoch so far
    (to which this callback appends each epoch's), the run's `settings`
    and, when it is written within an epoch, the running metrics of that
    epoch. `metrics`, from a checkpoint written within an epoch, are
    put back at the start of the first epoch, after Keras has reset the
    metrics, so that epoch's logs are those of an uninterrupted run (the
    model's metric variables must exist by then: `metric_paths`). A
    state with a non-finite loss or weight is never written: the last good
    checkpoint stays in place. A write that fails (a full disk) raises an
    `OSError` naming the file. A worker that is not the chief writes its
    copy beside the chief's, as `path + ".worker"`, or with
    `worker_copy=False` nothing (JAX's processes, which all restore the
    chief's).
    """

    def __init__(
        self,
        path,
        every,
        start_step,
        is_chief=True,
        history=None,
        settings=None,
        metrics=None,
        worker_copy=True,
        last_step=None,
    ):
        super().__init__()
        self.path = path
        self.worker_copy = worker_copy
        self.every = every
        self.last_step = last_step
        self.step = self._first_step = start_step
        self.saved_step = start_step
        self.is_chief = is_chief
        self.history = {} if history is None else history
        self.settings = settings
        self.metrics = metrics
        self._due = False

    def on_epoch_begin(self, epoch, logs=None):
        if self.metrics:
            variables = metric_paths(self.model)
            for key, value in self.metrics.items():
                variables[key].assign(value)
        self.metrics = None

    def on_train_begin(self, logs=None):
        self._first_step = self.step

    def on_train_batch_end(self, batch, logs=None):
        steps = (self.params or {}).get("steps")
        # Keras numbers a short last execution as if it were whole.
        trained = min(batch + 1, steps) if steps else batch + 1
        self.step = self._first_step + trained
        if self.step // self.every > self.saved_step // self.every:
            # At the epoch's last batch, wait for the epoch's logs.
            if steps and trained >= steps:
                self._due = True
            else:
                self._save(logs, metrics=True)

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        if self._due:
            self._save(logs)

    def on_train_end(self, logs=None):
        # Not at the end of each `fit` (the loop's epoch): the schedule.
        ended = self.last_step is None or self.step >= self.last_step
        if ended and self.step > self.saved_step:
            self._save(logs)

    def _save(self, logs, metrics=False):
        self._due = False
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            return
        if not all(np.all(np.isfinite(_value(v))) for v in self.model.weights):
            return
        path = self.path if self.is_chief else self.path + ".worker"
        if not (self.is_chief or self.worker_copy):
            path = None
        try:
            save(
                path,
                self.model,
                self.step,
                self.history,
                self.settings,
                metrics=metrics,
            )
        except OSError as error:
            kept = (
                f"the checkpoint of step {self.saved_step} is intact"
                if self.saved_step and os.path.exists(path)
                else "no checkpoint was written before"
            )
            raise OSError(
                f"Cannot write the checkpoint {path} at step {self.step}: "
                f"{error.strerror or error}; {kept}."
            ) from error
        self.saved_step = self.step


_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP)


class DirectoryInUseError(OSError):
    """Another process holds the lock of a run directory."""


class DirectoryLock:
    """An exclusive lock on a run directory, held by one process.

    `lock = DirectoryLock(path)` takes an advisory lock (`flock`) on the
    file `path` (created with the umask, holding the owner's pid), and
    raises `DirectoryInUseError` naming the directory and the owner while
    another process holds it. The system releases the lock when its
    process ends, killed or not, so a stale file never blocks a restart.
    `lock.release()` or leaving a `with` block releases it. On a file
    system that cannot lock files it warns, and locks nothing.
    """

    def __init__(self, path):
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in _NO_LOCKS:
                print(
                    f"Warning: the file system of {path} cannot lock files "
                    f"({error.strerror}); make sure that one process at a "
                    "time trains there.",
                    file=sys.stderr,
                )
                return
            owner = os.pread(self._fd, 64, 0).decode(errors="replace")
            os.close(self._fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            owner = f" (pid {owner.strip()})" if owner.strip() else ""
            raise DirectoryInUseError(
                f"Another process{owner} is training in "
                f"{os.path.dirname(path) or '.'} (it holds {path}). Wait for "
                "it to end, or use another --output_dir."
            ) from None
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            self.release()
            raise

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # Closing the file releases its lock.
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()
