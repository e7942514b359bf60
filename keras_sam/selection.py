"""The variables that a variant of the SAM step selects or reads.

ASAM's `T_w` scales the weights, not the offsets (`adaptive_variables_mask`);
SAM-ON perturbs the variables that `perturbed_variables` names
(`perturbed_mask`); Momentum-SAM moves the weights along the optimizer's
momentum (`momentum_variables`); LookSAM keeps a direction per variable
(`looksam_directions`), saved with the variables that own it
(`save_state_owners`); every variant leaves alone the variables that the
optimizer assigns their gradient to (`split_assigned`). `SAMModel` hands
them to `sam_step.compute_sam_gradients`.
"""

import contextlib
import functools
import re

import keras
import numpy as np
from keras import ops

from keras_sam import backend
from keras_sam import compat

NORMALIZATION_LAYERS = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
)


def adaptive_variables_mask(variables, adaptive_variables="weights"):
    """ASAM's `adaptive_mask` for `variables`, or `None` for all of them.

    `"weights"`: `True` for every variable except biases and normalization
    offsets (named `bias` or `beta`), as in the ASAM authors' code; `"all"`:
    `None`, every variable.
    """
    if adaptive_variables == "all":
        return None
    if adaptive_variables != "weights":
        raise ValueError(
            "`adaptive_variables` must be 'weights' or 'all'. Received: "
            f"adaptive_variables={adaptive_variables!r}"
        )
    return [v.name not in _OFFSET_NAMES for v in variables]


_OFFSET_NAMES = ("bias", "beta")


def perturbed_mask(model, perturbed_variables="all"):
    """SAM-ON's `perturbed_mask` for `model.trainable_variables`, or `None`.

    `"all"`: `None`, every variable; `"normalization"`: `True` for the
    weights of the normalization layers (`NORMALIZATION_LAYERS`) at any
    depth of `model`; a list of regular expressions: `True` for each
    variable whose `path` one of them matches (`re.search`). A selection
    of no variable raises.
    """
    if perturbed_variables == "all":
        return None
    if perturbed_variables == "normalization":
        selected = {
            id(v)
            for layer in compat.flatten_layers(model)
            if isinstance(layer, NORMALIZATION_LAYERS)
            for v in layer.trainable_variables
        }
        mask = [id(v) in selected for v in model.trainable_variables]
    else:
        patterns = [re.compile(p) for p in perturbed_variables]
        mask = [
            any(p.search(v.path) for p in patterns)
            for v in model.trainable_variables
        ]
    if not any(mask):
        raise ValueError(
            "`perturbed_variables` selects none of the trainable "
            "variables. Received: "
            f"perturbed_variables={perturbed_variables!r}; the "
            "variables are "
            f"{[v.path for v in model.trainable_variables]}"
        )
    return mask


def check_layers_read_variables(model, differentiated=True):
    """Raises if a layer of `model` would not see the weights that the
    passes hand in (`keras.StatelessScope`): a `TorchModuleWrapper` with
    trainable parameters, whose module reads its own `torch.nn.Parameter`s.
    With `differentiated`, also if they would get no gradient: on
    TensorFlow, a layer with weights that Keras may rematerialize
    (`tf.recompute_grad` differentiates only the inputs and the
    `tf.Variable`s it reads)."""
    if differentiated and backend.BACKEND == "tensorflow":
        rematerialized = [
            layer.name
            for layer in compat.rematerialized_layers(model)
            if layer.trainable_weights
        ]
        if rematerialized:
            raise ValueError(
                "On TensorFlow, Keras rematerializes a layer with "
                "`tf.recompute_grad`, which differentiates its inputs and "
                "`tf.Variable`s, not the weights keras_sam hands in (w and "
                "w + ε): they would get no gradient. Build these layers "
                "outside `keras.RematScope` (its 'activations' mode works), "
                f"or use JAX or PyTorch. Received: layers {rematerialized} "
                f"of model {model.name!r}"
            )
    wrapped = [
        layer.name
        for layer in _torch_module_layers(model)
        if layer.trainable_variables
    ]
    if wrapped:
        raise ValueError(
            "keras_sam evaluates the loss at given weights (w and w + ε) "
            "through Keras' variables, which a `TorchModuleWrapper`'s module "
            "does not read, so its parameters would not train. Rebuild "
            "those layers with Keras layers, or freeze them "
            f"(`layer.trainable = False`). Received: layers {wrapped} of "
            f"model {model.name!r}"
        )


@contextlib.contextmanager
def module_buffers_kept(model):
    """Puts back, on exit, the buffers of `model`'s `TorchModuleWrapper`
    modules (`BatchNorm1d`'s running statistics) as they were on entry.

    A module updates them in place at each training call, outside Keras'
    variables and so outside a pass's state: around the perturbed passes,
    this drops their updates, as the step drops those of Keras'
    `BatchNormalization`, and the clean passes' stay (one per part with
    `micro_batches`, where Keras' move by the parts' mean update).
    """
    saved = [
        (layer.module, name, buffer.clone())
        for layer in _torch_module_layers(model)
        for name, buffer in layer.module.named_buffers()
    ]
    try:
        yield
    finally:
        for module, name, value in saved:
            # By name: a module may rebind a buffer instead of updating it.
            module.get_buffer(name).copy_(value)


def _torch_module_layers(model):
    # Only Keras' PyTorch backend wraps torch modules: no walk elsewhere.
    if backend.BACKEND != "torch":
        return []
    return [
        layer
        for layer in compat.flatten_layers(model)
        if isinstance(layer, keras.layers.TorchModuleWrapper)
    ]


def all_reduces_in_passes(model):
    """Whether a pass of `model` may all-reduce across replicas: a
    trainable `BatchNormalization(synchronized=True)` under a
    `tf.distribute` strategy, of one replica too (on the other backends
    Keras ignores `synchronized`; a frozen one uses its moving statistics).
    """
    return backend.in_strategy() and any(
        getattr(layer, "synchronized", False) and layer.trainable
        for layer in compat.flatten_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def _momentum_optimizer(optimizer):
    """The SGD with momentum inside `optimizer` (loss scaling unwrapped)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not isinstance(inner, keras.optimizers.SGD) or not inner.momentum:
        raise ValueError(
            "`perturbation='momentum'` (Momentum-SAM) moves the weights "
            "along the optimizer's momentum, so it needs "
            "`keras.optimizers.SGD(momentum=...)` with a momentum > 0. "
            f"Received: optimizer={type(inner).__name__}"
            + (
                f"(momentum={inner.momentum})"
                if isinstance(inner, keras.optimizers.SGD)
                else ""
            )
        )
    return inner


def momentum_variables(optimizer, variables):
    # Checked at the first step, not in `compile`: Keras does not restore
    # the compiled state of a model whose `compile` is overridden.
    _momentum_optimizer(optimizer)
    return compat.optimizer_slots(
        optimizer, lambda inner: inner.momentums, variables
    )


def values(variables):
    """The variables' values, `None` for a `None` entry: Keras' optimizers
    keep no slot for a variable that they assign (`is_assigned`)."""
    return [
        None if v is None else ops.convert_to_tensor(v.value) for v in variables
    ]


def replica_state(variables, name):
    """A zero float32 variable per variable: a variant's state (LookSAM's
    direction `g_v`, F-SAM's moving average of the clean gradient), named
    `<name>_<i>` for the i-th, so that each has its own path (PyTorch's
    `state_dict` and JAX's `get_state_tree` key them by it).

    On-read: each replica keeps the state of its own gradient, as it keeps
    its own ε; a checkpoint stores their mean. Under `keras.distribution`
    each entry takes its variable's layout, as Keras' optimizers give their
    slots. `state_of` picks the entries of the variables that train at a
    step.
    """
    return [
        keras.Variable(
            keras.initializers.Zeros(),
            shape=v.shape,
            dtype="float32",
            trainable=False,
            aggregation="mean",
            synchronization="on_read",
            name=f"{name}_{i}",
            layout=compat.variable_layout(v),
        )
        for i, v in enumerate(variables)
    ]


def save_state_owners(store, base, owners):
    """Writes, under `state_owner_index`, the index in `base.weights` of
    each variable of `owners` (which own the variant state, an entry each
    in order), or -1 for one the base no longer has (quantized away).

    A layer frozen after the build owns state that a model loaded from the
    file's config does not make; `state_loader` picks the entries by it.
    """
    if owners is not None and list(store.keys()):
        position = {id(w): i for i, w in enumerate(base.weights)}
        store["state_owner_index"] = np.array(
            [position.get(id(v), -1) for v in owners], "int32"
        )


def state_loader(base, owners, load_rest):
    """A function of a store that calls `load_rest` with its state entries
    (`save_state_owners`) for `owners`, the variables this model made its
    state for.

    Each state list holds an entry per saved owner, in order. A saved owner
    that is no owner here (frozen since, or gone) is skipped; an owner that
    was none there gets zeros. A file without the record loads as it is.
    """
    return functools.partial(_load_state, base, owners, load_rest)


def _saved_owners(store, keys, count):
    # The `base.weights` index of each saved owner; the record before
    # quantized models kept their state was a 0/1 `state_owners` mask over
    # the weights.
    if "state_owner_index" in keys:
        return [int(i) for i in np.asarray(store["state_owner_index"])]
    mask = np.asarray(store["state_owners"])
    return list(np.flatnonzero(mask)) if len(mask) == count else None


def _load_state(base, owners, load_rest, store):
    keys = list(store.keys())
    records = {"state_owner_index", "state_owners"}
    if not records & set(keys):
        load_rest(store)
        return
    weights = base.weights
    saved = _saved_owners(store, keys, len(weights))
    rest = {key: store[key] for key in keys if key not in records}
    if not saved or max(saved) >= len(weights) or len(rest) % len(saved):
        load_rest(rest)  # another model: Keras' count check reports it
        return
    index = {id(weights[j]): i for i, j in enumerate(saved) if j >= 0}
    remapped = {}
    for offset in range(0, len(rest), len(saved)):
        for v in owners:
            i = index.get(id(v))
            remapped[str(len(remapped))] = (
                np.zeros(v.shape, "float32")
                if i is None
                else rest[str(offset + i)]
            )
    load_rest(remapped)


def state_of(variables, state, owners, option):
    """The entries of `state` (`replica_state` of the variables `owners`,
    or None) for `variables`, the trainable variables of a step.

    A layer frozen after the state was made drops out of `variables`, so
    the entries are picked by variable, not by position. A variable that
    had no entry (a layer unfrozen since) raises, as Keras' optimizers do
    for variables they were not built with: `option` names the variant.
    """
    if state is None:
        return None
    index = {id(owner): i for i, owner in enumerate(owners)}
    new = [v.path for v in variables if id(v) not in index]
    if new:
        raise ValueError(
            f"`{option}` keeps a state per trainable variable of the base, "
            "made when the model was built; these variables have become "
            "trainable since, or are not the base's (layers of a `SAMModel` "
            f"subclass): {new}. Put a subclass's layers in the base; after "
            "changing which layers train, make a new `SAMModel(model.base, "
            "**model.options.as_kwargs())` and compile it, as Keras asks for "
            "a new optimizer."
        )
    return [state[index[id(v)]] for v in variables]


def is_assigned(variable):
    """Whether the optimizer assigns `variable` its gradient (flagged
    `overwrite_with_gradient`: Keras' float8 scaling state)."""
    return getattr(variable, "overwrite_with_gradient", False)


def weights(model):
    """`model.trainable_variables` without the assigned ones: the weights
    of the loss landscape."""
    return [v for v in model.trainable_variables if not is_assigned(v)]


def split_assigned(variables, gradients):
    """(`gradients` with zeros for the variables that the optimizer assigns
    their gradient to, those gradients with `None` elsewhere).

    Keras' float8 layers return their new scaling state (scales, amax
    histories) as the gradients of variables flagged
    `overwrite_with_gradient`. That is state, as BatchNorm's statistics
    are: ε, the norms and the variants' directions leave it alone, and it
    comes from the clean passes (`batch_parts.merge_parts`), put back by
    `with_assigned`.
    """
    assigned = [
        g if is_assigned(v) else None for v, g in zip(variables, gradients)
    ]
    zeroed = [
        g if a is None else ops.zeros_like(g)
        for g, a in zip(gradients, assigned)
    ]
    return zeroed, assigned


def with_assigned(gradients, assigned):
    """`gradients` with the `assigned` values (`split_assigned`) put back."""
    return [g if a is None else a for g, a in zip(gradients, assigned)]
