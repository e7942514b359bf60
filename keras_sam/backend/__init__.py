"""What the SAM step needs that differs per Keras backend.

`keras_sam` is written in `keras.ops`; the few things that `keras.ops` does
not offer live in small modules per backend, as Keras splits
`keras/src/backend/<name>/trainer.py`:

- `value_and_gradients(fn, weights)`: `fn(weights)` returns
  `(objective, aux)`; returns `(aux, ∇objective)`.
- `hessian_vector_product(fn, weights, vector)`: `∇²fn(weights) · vector`.
- `function(fn)`: `fn` compiled (`tf.function`, `jax.jit`).
- `cond(predicate, true_fn, false_fn)`: branches return lists of tensors.
- `replica_count()` and `all_reduce(tensors, op)`: the replicas among which
  a batch is split, and a sum or mean across them.

  Each backend gives these two for lists of tensors; the `cond` and
  `all_reduce` defined below, which the step calls, add what is the same
  on every backend (a Python `bool` predicate, nested outputs with `None`
  entries, `None` tensors left out of the reduction).
- `data_parallel_shards()`: the shards of a batch that one call of the
  step sees whole (`keras.distribution` on JAX), each to get its own ε;
  `map_shards(step, data, state, shards)`: their steps as one computation
  that keeps each on its devices (`jax_shards`), `None` where one call of
  the step sees one shard.
- `check_per_replica_call(name)`: raises when a per-replica function is
  called where replicas cannot be reduced; `in_strategy()`: whether the
  step runs under a `tf.distribute` strategy.
- `read_live(variable)`: a variable's value when the step runs, also in a
  compiled step that does not hold it in its state.
- `is_symbolic(tensor)`: whether its value is unknown until run time.
- `is_multi_worker(strategy)` and `first_local_batch(strategy, iterator)`:
  whether a `tf.distribute` strategy spans workers, and one replica's
  share of a batch, for `compat`'s multi-worker workarounds.
- `sum_duplicate_rows(tensors)`: each sparse gradient (TensorFlow's
  `tf.IndexedSlices` of an `Embedding` or a gather) with its repeated rows
  summed, so that elementwise math sees the dense gradient's values;
  `to_dense(tensors)`: each sparse gradient as a dense tensor.
- `random_state()` and `set_random_state(state)`: the backend's global
  random-number state, which random layers may draw from outside Keras'
  seed variables (PyTorch's unseeded dropout), so that both passes draw
  the same masks; `None` where every draw goes through seed variables.
- `apply_gradients(optimizer, gradients, variables)`: as the optimizer's
  own, in a way the trainer's step can run.
- `train_step(model, step, *args)`: runs the stateful step of `SAMModel`
  in the trainer's calling convention (`stateful_train_step` below makes
  it `SAMModel.train_step`).

A backend's modules define only where it differs from
`keras_sam.backend.common`'s defaults (one replica, dense gradients, random
draws through Keras' seed variables, an eager step): `tensorflow` with
`tensorflow_distribute` (its replicas), `jax` with `jax_shards` (its data
shards), and `torch` with `torch_compile` (its step under
`jit_compile=True`).

Workarounds of Keras' own code (its TensorFlow trainer's multi-worker
defect included) are not here but in `keras_sam.compat`.
"""

import functools
import importlib

import keras
from keras import ops
from keras import tree

from keras_sam.backend import common

INTERFACE = (
    "all_reduce",
    "apply_gradients",
    "check_per_replica_call",
    "cond",
    "data_parallel_shards",
    "first_local_batch",
    "function",
    "hessian_vector_product",
    "in_strategy",
    "is_multi_worker",
    "is_symbolic",
    "map_shards",
    "random_state",
    "read_live",
    "replica_count",
    "set_random_state",
    "sum_duplicate_rows",
    "to_dense",
    "train_step",
    "value_and_gradients",
)

BACKEND = keras.backend.backend()
if BACKEND not in ("tensorflow", "jax", "torch"):
    raise ImportError(
        "keras_sam runs on Keras' TensorFlow, JAX and PyTorch backends. "
        f"Received: KERAS_BACKEND={BACKEND!r}"
    )
# Each backend's modules, then the defaults.
_MODULES = [
    importlib.import_module(f"keras_sam.backend.{name}")
    for name in {
        "tensorflow": ("tensorflow", "tensorflow_distribute"),
        "jax": ("jax", "jax_shards"),
        "torch": ("torch", "torch_compile"),
    }[BACKEND]
] + [common]
_PRIMITIVES = {
    name: next(getattr(m, name) for m in _MODULES if hasattr(m, name))
    for name in INTERFACE
}
globals().update(_PRIMITIVES)


def stateful_train_step(step):
    """`step(model, data)`, written statefully, as a `train_step` method.

    Keras' trainers call `model.train_step(data)` (TensorFlow, PyTorch) or
    `model.train_step(state, data)` (JAX's stateless trainer); the
    backend's `train_step` runs `step` in that convention.
    """

    @functools.wraps(step)
    def train_step(model, *args):
        return _PRIMITIVES["train_step"](
            model, functools.partial(step, model), *args
        )

    return train_step


def cond(predicate, true_fn, false_fn, run_both=False):
    """`true_fn()` or `false_fn()`, chosen at run time unless `predicate` is
    a Python bool. Both return the same nested structure of tensors, with
    `None` entries in the same places. Sparse gradients come out dense: one
    branch may combine what the other leaves sparse (GSAM, LookSAM). With
    `run_both`, both branches run and `predicate` picks their outputs: for
    branches that all-reduce, which `tf.distribute` refuses in `tf.cond`.
    """
    if isinstance(predicate, bool):
        return true_fn() if predicate else false_fn()
    structure = []

    def without_none(fn):
        def run():
            output = fn()
            structure.append(output)
            present = [t for t in tree.flatten(output) if t is not None]
            return _PRIMITIVES["to_dense"](present)

        return run

    if run_both:
        values = iter(
            ops.where(predicate, a, b)
            for a, b in zip(without_none(true_fn)(), without_none(false_fn)())
        )
    else:
        values = iter(
            _PRIMITIVES["cond"](
                predicate, without_none(true_fn), without_none(false_fn)
            )
        )
    return tree.pack_sequence_as(
        structure[0],
        [
            None if t is None else next(values)
            for t in tree.flatten(structure[0])
        ],
    )


def all_reduce(tensors, op="sum"):
    """The backend's `all_reduce` of the tensors that are not `None`."""
    present = [t for t in tensors if t is not None]
    if not present or _PRIMITIVES["replica_count"]() == 1:
        return tensors
    reduced = iter(_PRIMITIVES["all_reduce"](present, op))
    return [None if t is None else next(reduced) for t in tensors]
