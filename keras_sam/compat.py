"""Every reading of private Keras (and KerasHub) code in keras_sam and its
trainers, with why and the versions.

Each function here reaches into Keras' internals (`keras.src`, a private
method or attribute, a saving internal) or works around a Keras defect. Each
docstring names the Keras issue or the reason, and each function has a test
in `tests/compat_test.py` that fails when the workaround stops working and,
where it can, when Keras no longer needs it (the test then says which
function to remove). All were checked against Keras 3.15.1.

The TensorFlow trainer's multi-worker defect (keras-team/keras#20585) is
worked around here too: it is a defect of Keras' trainer, and it belongs
with the other Keras workarounds that a Keras upgrade must recheck. What it
needs of `tf.distribute` (whether a strategy spans workers, one replica's
share of a batch) is in `keras_sam.backend.tensorflow_distribute`, so
that nothing here imports a framework.
"""

import functools
import os
import random
import sys

import keras
from keras.src.backend.common import global_state
from keras.src.backend.common import stateless_scope as stateless_scope_lib
from keras.src.random import seed_generator
from keras.src.saving import saving_lib
from keras.src.utils import io_utils
from keras.src.utils import naming

from keras_sam import backend

SAM_STATE = "sam_model"


def variable_layout(variable):
    """`variable`'s layout under `keras.distribution`, for a variable made
    like it (Keras' optimizers give their slots `_layout`, private), or
    `None`. A variable made in a symbolic build (a base built at the first
    step on JAX) is not yet initialized and has none: the distribution's
    for its path then. Checked against Keras 3.15.1.
    """
    layout = getattr(variable, "_layout", None)
    distribution = keras.distribution.distribution()
    if layout is None and distribution is not None:
        layout = distribution.get_variable_layout(variable)
    return layout


def keep_state_open(model):
    """A wrapper's `_lock_state`, which Keras' `build` calls: it leaves the
    model's state open, as Keras' Functional and Sequential models do.

    A `SAMModel` of a built base is built in its constructor (unless a
    subclass overrides `call`), so Keras' lock would refuse the state a
    subclass adds after `super().__init__`, which Keras asks for in
    `__init__`.
    """
    del model


def schedule_step(optimizer):
    """The step at which `optimizer` evaluates its learning-rate schedule.

    Keras evaluates a `LearningRateSchedule` at the count of calls to
    `apply` (`optimizer._iterations`), while `optimizer.iterations` counts
    updates: the two differ under `gradient_accumulation_steps=k`, where
    `iterations` is the calls // k. A ρ schedule is evaluated at this step,
    so that `RhoFollowingLearningRate` follows the rate the optimizer
    applies. A `LossScaleOptimizer` evaluates its inner optimizer's.
    Checked against Keras 3.15.1.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner._iterations


def learning_rate_schedule(optimizer):
    """The `LearningRateSchedule` `optimizer` applies, or `None` for a
    constant or variable rate (a `LossScaleOptimizer`'s inner one's).

    Keras offers the schedule only as the private `_learning_rate` (the
    public `learning_rate` is its current value). Checked against Keras
    3.15.1.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    rate = inner._learning_rate
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        return rate
    return None


def stateless_scope(mapping):
    """A `StatelessScope` over `mapping` that also sees the enclosing one's.

    Inside Keras' stateless JAX train step, every variable is read from the
    enclosing scope; a nested `keras.StatelessScope` reads only its own
    mapping, so it must map the enclosing scope's variables too (the loss
    scale, the metrics), or it would read their stale stored values. Keras
    offers no public way to reach the enclosing scope
    (`keras.src.backend.common.stateless_scope.get_stateless_scope`).
    Checked against Keras 3.15.1.
    """
    scope = keras.StatelessScope(state_mapping=mapping, collect_losses=True)
    outer = stateless_scope_lib.get_stateless_scope()
    if outer is not None:
        scope.state_mapping = {**outer.state_mapping, **scope.state_mapping}
    return scope


def own_metrics(model, with_loss_trackers=False):
    """`model.metrics` but those its `compile` made (its loss tracker,
    compiled metrics and, unless `with_loss_trackers`, the per-output loss
    trackers of its compiled loss): the trackers its own code updates, as a
    `compute_loss` override does. Keras' `metrics` leaves out every metric
    of a sublayer that is a model, so a wrapper adds these; what `compile`
    made is known only by private attributes. Checked against Keras 3.15.1.
    """
    made = set()
    if model.compiled:
        made = {id(model._loss_tracker), id(model._compile_metrics)}
        if model._compile_loss is not None and not with_loss_trackers:
            made.update(id(m) for m in model._compile_loss.metrics)
    return [m for m in model.metrics if id(m) not in made]


def compute_loss_with(
    model,
    lender,
    x=None,
    y=None,
    y_pred=None,
    sample_weight=None,
    training=True,
):
    """`model.compute_loss(...)` with `lender`'s compiled loss if it has none.

    A base model that overrides `compute_loss` computes the compiled part
    with `super().compute_loss`, which reads the private `_compile_loss` of
    the base; a base wrapped uncompiled has none, and the loss given to
    `SAMModel.compile` is the wrapper's. It is lent for the call. The call
    goes through Keras' `_compute_loss`, which passes `training` only to an
    override that takes it (as Keras' own train step does). Checked against
    Keras 3.15.1.
    """
    own = model._compile_loss
    if own is None:
        model._compile_loss = lender._compile_loss
    try:
        return model._compute_loss(
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=training,
        )
    finally:
        model._compile_loss = own


def loss_tracker(model):
    """The metric behind the `loss` that `fit` logs.

    Keras' own train step updates the private `model._loss_tracker`; a
    train step that replaces it must update the same metric for `fit` to
    log and reset its loss. Checked against Keras 3.15.1.
    """
    return model._loss_tracker


def set_untracked_attribute(layer, name, value):
    """Sets `layer.<name> = value` without Keras tracking it.

    Keras' `Layer.__setattr__` adds a `keras.Variable` to the layer's
    weights, so a ρ held as a variable would be saved as a weight and
    counted in `non_trainable_weights`; it is a hyper-parameter that a
    callback may assign, read at every step. Keras has no public way to
    hold a variable untracked. Checked against Keras 3.15.1.
    """
    object.__setattr__(layer, name, value)


def pipeline_arguments(base, method, arguments):
    """The arguments of `keras.Model.<method>` (`fit`, `evaluate`,
    `predict` or a `*_on_batch`) once `base`, a KerasHub pipeline model (a
    `keras_hub.models.Task`), has prepared them as its own `<method>` does.

    KerasHub's `PipelineModel` overrides these methods to batch the data
    and map its `preprocess_samples` (the task's preprocessor) over it, or
    to run it on the one batch, then calls `keras.Model`'s with the
    prepared data. A wrapper's methods are `keras.Model`'s, so they fed a
    task raw data. For `fit`, `evaluate` and `predict` the preparation is
    KerasHub's own, run on a stand-in whose next class after
    `PipelineModel` returns the arguments instead of training. Any other
    base gets `arguments` back. Checked against keras-hub 0.32.0.
    """
    # Only a model of an imported keras_hub can be a pipeline model.
    module = sys.modules.get("keras_hub.src.utils.pipeline_model")
    if module is None or not isinstance(base, module.PipelineModel):
        return arguments
    if method.endswith("_on_batch"):
        # As KerasHub's, but without its conversion of `y` to one tensor,
        # which fails for a dict of labels (a detector's boxes, classes).
        data = base.preprocess_samples(
            arguments.pop("x"),
            arguments.pop("y", None),
            arguments.pop("sample_weight", None),
        )
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if method == "predict_on_batch":
            return {"x": x}
        return {**arguments, "x": x, "y": y, "sample_weight": sample_weight}
    stand_in_class = _pipeline_stand_in(module.PipelineModel)
    # Not initialized: `PipelineModel.__init__` resets the class's bases,
    # which Keras changes for the functional tasks that exist.
    stand_in = object.__new__(stand_in_class)
    object.__setattr__(stand_in, "preprocess_samples", base.preprocess_samples)
    return getattr(stand_in, method)(**arguments)


@functools.cache
def _pipeline_stand_in(pipeline_model):
    class Arguments(keras.Model):
        def _arguments(self, **arguments):
            return arguments

        fit = evaluate = predict = _arguments

    class StandIn(pipeline_model, Arguments):
        pass

    return StandIn


def flatten_layers(model):
    """`model` and every layer nested in it, at any depth.

    `model.layers` lists only the direct children; Keras' private
    `_flatten_layers` walks nested models too (the traversal Keras itself
    uses). Checked against Keras 3.15.1.
    """
    return list(model._flatten_layers())


def rematerialized_layers(model):
    """The layers of `model` whose whole call Keras may rematerialize: made
    in a `keras.RematScope` of mode "full", "list_of_layers" (naming them)
    or "larger_than" (whose output size, known only at the call, decides),
    not "activations", which wraps only the activation, nor `None`.

    Keras keeps a layer's mode only as the private `_remat_mode`. Checked
    against Keras 3.15.1.
    """
    found = []
    for layer in flatten_layers(model):
        mode = getattr(layer, "_remat_mode", None)
        if mode is None or mode.mode in (None, "activations"):
            continue
        if mode.mode != "list_of_layers" or layer.name in mode.layer_names:
            found.append(layer)
    return found


def optimizer_slots(optimizer, slots, variables):
    """`slots[i]` for each of `variables`, building `optimizer` first.

    `slots` is a list of an optimizer's per-variable state (e.g. SGD's
    `momentums`), in the order of the variables it was built with; Keras'
    private `_get_variable_index` maps a variable to its index. An
    optimizer not built yet is built as `optimizer.apply` would at its
    first call (under its name scope, so its variables get the same paths),
    since its state must exist before the first update. `slots` is a
    callable of the built optimizer. Checked against Keras 3.15.1.
    """
    if not optimizer.built:
        with keras.name_scope(optimizer.name, caller=optimizer):
            optimizer.build(variables)
        optimizer.built = True
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    state = slots(inner)
    slots_of, new = [], []
    for v in variables:
        try:
            slots_of.append(state[inner._get_variable_index(v)])
        except KeyError:  # not built with it
            new.append(v.path)
    if new:
        # Keras' `apply` refuses such a variable with this ValueError.
        raise ValueError(
            f"Unknown variables: {new}. The optimizer can only be called for "
            "the variables it was built with (a layer made trainable since "
            "needs the model compiled again, with a new optimizer). "
            f"Received: optimizer={optimizer.name!r}"
        )
    return slots_of


def public_optimizer_classes(config):
    """`config` with backend-specific optimizer classes named by their
    public class in `keras.optimizers`.

    On PyTorch, Keras serializes `SGD` as its PyTorch subclass
    (`keras.src.backend.torch.optimizers.torch_sgd.SGD`), and a file that
    names it would train with PyTorch's kernels on another backend (and
    fail). `keras.optimizers.SGD` picks each backend's own class. Checked
    against Keras 3.15.1.
    """
    if isinstance(config, list):
        return [public_optimizer_classes(c) for c in config]
    if not isinstance(config, dict):
        return config
    config = {k: public_optimizer_classes(v) for k, v in config.items()}
    module = config.get("module")
    if (
        isinstance(module, str)
        and module.startswith("keras.src.backend.")
        and ".optimizers." in module
        and hasattr(keras.optimizers, config.get("class_name", ""))
    ):
        config["module"] = "keras.optimizers"
    return config


def reset_layer_names():
    """Restarts Keras' counters of automatic layer names (`dense`,
    `dense_1`, ...), so that a model built again gets the same names.

    The trainers key their checkpoints by variable path, so a run resumed
    in a process that built other models first must name its layers as
    the run that wrote the checkpoint did. `keras.backend.clear_session()`
    resets the counters too, but after it a new `MirroredStrategy`'s
    all-reduces can collide with an earlier strategy's in the same
    process; Keras has no public way to reset the names alone
    (`keras.src.utils.naming.reset_uids`). Checked against Keras 3.15.1.
    """
    naming.reset_uids()


def maybe_symbolic_build(model, iterator=None, data_batch=None):
    """`keras.Model._maybe_symbolic_build`, multi-worker safe.

    Assigned as `SAMModel._maybe_symbolic_build`. Keras' TensorFlow trainer
    builds from one batch that it all-reduces eagerly with
    `strategy.reduce`, which MultiWorkerMirroredStrategy cannot do
    (keras-team/keras#20585). One replica's share of the batch has the
    same structure and serves as well.

    Without a strategy Keras' TensorFlow trainer builds nothing here: the
    trace of the first step builds the compiled loss. A step that runs
    eagerly has no trace before it, so its per-output loss trackers were
    made inside the first SAM pass's stateless scope, and that step's
    update to them was lost. Such a model is built here, as Keras' other
    backends build every model, unless only an eager call can run it
    (it reads `.numpy()`, say): that one is built in its first step, as
    Keras does. Other strategies and backends build as Keras does.
    Checked against Keras 3.15.1.
    """
    if backend.BACKEND == "tensorflow" and model.run_eagerly:
        if model._distribute_strategy is None:
            try:
                model._symbolic_build(iterator=iterator, data_batch=data_batch)
            except Exception:
                pass  # Keras' own step builds it, or says what fails.
            return None
    strategy = model.distribute_strategy
    if iterator is not None and data_batch is None:
        if backend.is_multi_worker(strategy):
            data_batch = backend.first_local_batch(strategy, iterator)
            if data_batch is not None:
                iterator = None
    return keras.Model._maybe_symbolic_build(
        model, iterator=iterator, data_batch=data_batch
    )


def logs_for_workers(logs):
    """Logs as shape-[1] tensors under a multi-worker strategy.

    Keras' TensorFlow trainer averages a step's logs across workers with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars
    (keras-team/keras#20585). The logged values are the same on every
    replica, so a length-1 axis makes that reduction the identity. Elsewhere
    `logs` is returned as is (JAX's `(logs, state)` included). Checked
    against Keras 3.15.1.
    """
    if not backend.is_multi_worker():
        return logs
    return {key: keras.ops.reshape(v, [1]) for key, v in logs.items()}


def _weights_store(filepath, mode, max_shard_size=None):
    if str(filepath).endswith(".weights.json") or max_shard_size is not None:
        if mode == "w":
            return saving_lib.ShardedH5IOStore(
                filepath, max_shard_size, mode=mode
            )
        return saving_lib.ShardedH5IOStore(filepath, mode=mode)
    return saving_lib.H5IOStore(filepath, mode=mode)


def save_weights(model, filepath, overwrite=True, max_shard_size=None):
    """Writes `model.base`'s weights at the root, the rest under `sam_model/`.

    Keras writes a model's `.weights.h5` file by walking its attributes, so
    a wrapper's file nests the base model's weights under `base/` and the
    bare base model cannot read it. This writes the base's weights at the
    root, as `base.save_weights` would, and the wrapper's own state (the
    optimizer, the variants' state) under `sam_model/`, a group that the
    base model ignores. Keras has no public API for a file's layout: this
    calls the `keras.src.saving.saving_lib` functions that
    `Model.save_weights` itself calls. Checked against Keras 3.15.1.
    """
    if not overwrite and os.path.exists(filepath):
        if not io_utils.ask_to_proceed_with_overwrite(filepath):
            return
    store = _weights_store(filepath, "w", max_shard_size)
    try:
        visited = set()
        saving_lib._save_state(model.base, store, None, "", visited)
        saving_lib._save_state(model, store, None, SAM_STATE, visited)
    finally:
        store.close()


def weights_file_has_path(filepath, path):
    """Whether the weights file has a group at `path` (e.g. `sam_model`).

    Checked against Keras 3.15.1.
    """
    store = _weights_store(filepath, "r")
    try:
        return store.has_path(path)
    finally:
        store.close()


def load_weights(model, filepath, skip_mismatch=False):
    """Reads a file written by `save_weights` into `model` and its base."""
    _load_parts(filepath, [(model.base, ""), (model, SAM_STATE)], skip_mismatch)


def load_base_weights(model, filepath, skip_mismatch=False):
    """Reads a file in the base's layout into `model.base`, and the
    optimizer state of a compiled model's file (at `optimizer/`) into
    `model.optimizer`, as Keras loads it into a compiled model's.

    `base.load_weights` alone would drop it: the base is not compiled with
    the wrapper's optimizer. As in Keras, a state of another size (an
    optimizer not built yet) is skipped with Keras' warning.
    """
    model.base.load_weights(filepath, skip_mismatch)
    optimizer = getattr(model, "optimizer", None)  # None until compiled
    if optimizer is None or optimizer is getattr(model.base, "optimizer", 0):
        return
    _load_parts(filepath, [(optimizer, "optimizer")], skip_mismatch)


def _load_parts(filepath, parts, skip_mismatch):
    # Each `(saveable, path in the file)` of `parts` that the file holds
    # (an uncompiled model's has no optimizer), in turn, through
    # `keras.src.saving.saving_lib`, as `Model.load_weights` reads a model;
    # checked against Keras 3.15.1.
    store = _weights_store(filepath, "r")
    failed, errors, visited = set(), {}, set()
    try:
        for saveable, path in parts:
            if path and not store.has_path(path):
                continue
            saving_lib._load_state(
                saveable,
                store,
                None,
                path,
                skip_mismatch,
                visited,
                failed,
                errors,
            )
            visited.add(id(saveable))
    finally:
        store.close()
    if failed:
        saving_lib._raise_loading_failure(errors, warn_only=skip_mismatch)


def restoring_state_on_error(model, train_function):
    """JAX: `train_function`, putting the state it was given back into the
    model's variables when it raises.

    Keras' JAX `fit` takes the values out of the variables before a step
    and puts back the state the last step returned. When the first step
    raises (a refused option, a shape error, Ctrl-C while it compiles),
    there is none, and the model is left without values; in a later `fit`,
    a stale state goes back by position, into the wrong variables if which
    ones train has changed. Either way the model is lost. (The end of an
    epoch of unknown length raises too; the state put back is the one
    Keras would.) A value that a step ran with on an accelerator was
    donated to it and is gone: with `steps_per_execution > 1`, an error in
    a later step of the same call still loses those. Checked against Keras
    3.15.1.
    """
    backend_name = keras.backend.backend()
    if backend_name != "jax" or getattr(train_function, "restores", False):
        return train_function

    def restoring(state, data):
        try:
            return train_function(state, data)
        except BaseException:
            variables = (
                model.trainable_variables,
                model.non_trainable_variables,
                model.optimizer.variables,
                model.metrics_variables,
            )
            for group, values in zip(variables, state):
                for variable, value in zip(group, values):
                    if not value.is_deleted():  # donated to a step that ran
                        variable.assign(value)
            model._jax_state_synced = True
            raise

    restoring.restores = True
    return restoring


def stateful_variables(model, create=False):
    """`model.non_trainable_variables` and, off JAX, the states of stateful
    RNNs and that of Keras' global SeedGenerator, which random ops with
    `seed=None` draw from (`keras.random.normal(shape)`, as ported code
    writes it).

    Keras' `RNN(stateful=True)` keeps its states in variables it does not
    track (`_create_state_variables`); a plain step assigns them, so the
    next batch starts from them (not on JAX, whose trainer drops them).

    A SAM pass runs in a stateless scope, which keeps every variable's
    update to itself; the step writes back the state it knows of. Without
    the global seed state, such a layer drew the same noise at every step,
    even at ρ = 0. With `create`, the generator is made if it is not yet
    (as Keras makes it at the first draw), so that a traced step holds it;
    Python's `random`, which Keras seeds it from, is left as it was, for
    what else draws from it (`PyDataset`'s shuffling). On JAX, Keras
    refuses unseeded random ops in a traced function. Keras offers no
    public way to reach the generator
    (`keras.src.random.seed_generator.global_seed_generator`). Checked
    against Keras 3.15.1.
    """
    variables = model.non_trainable_variables
    if keras.backend.backend() == "jax":
        return variables
    variables = variables + [
        state
        for layer in flatten_layers(model)
        if isinstance(layer, keras.layers.RNN) and layer.stateful
        for state in keras.tree.flatten(layer.states or [])
    ]
    if create:
        python_state = random.getstate()
        seed_generator.global_seed_generator()
        random.setstate(python_state)
    generator = global_state.get_global_attribute(
        seed_generator.GLOBAL_SEED_GENERATOR
    )
    return variables if generator is None else variables + [generator.state]


def unshared_inputs(batch):
    """`(x, y, sample_weight)` with `x` copied, on PyTorch.

    Some Keras layers change their input in place on PyTorch:
    `RandomBrightness` (and `RandomColorJitter` through it) adds its delta
    with `images += ...`. A plain `fit` runs the model once per batch, but
    a SAM step runs it twice on the same batch: the perturbed pass saw the
    images the clean pass had brightened, and took another gradient.
    Checked against Keras 3.15.1.
    """
    if keras.backend.backend() != "torch":
        return batch
    x, y, sample_weight = batch
    x = keras.tree.map_structure(
        lambda t: t if t is None else keras.ops.copy(t), x
    )
    return x, y, sample_weight


def check_second_derivatives(model, training):
    """Refuses a Hessian through BatchNorm's batch statistics on TensorFlow.

    Keras' TensorFlow `ops.moments`, which `BatchNormalization` calls in
    training mode, is `tf.nn.moments`: it stops the gradient of the mean
    inside the variance. First derivatives are exact (the variance is
    stationary in its mean), second derivatives are not (the Hessian of
    the variance loses its −1/n² terms), so `keras_sam.analysis` would
    report a wrong spectrum without a word. `training=False` (moving
    statistics) and the JAX and PyTorch backends are exact. A Keras defect
    of the TensorFlow backend; checked against Keras 3.15.1 with TensorFlow
    2.21.
    """
    if not training or keras.backend.backend() != "tensorflow":
        return
    # A frozen BatchNormalization normalizes with its moving statistics
    # in training mode too, as Keras' layer does.
    names = [
        layer.name
        for layer in flatten_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
        and layer.trainable
    ]
    if names:
        raise ValueError(
            "On TensorFlow, a Hessian through BatchNormalization in training "
            "mode is wrong: Keras' batch variance (tf.nn.moments) stops the "
            "gradient of its mean, which second derivatives need. Pass "
            "`training=False` (moving statistics), or use the JAX or "
            f"PyTorch backend. Received: training=True, with {names}"
        )
