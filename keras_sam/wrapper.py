"""What a model that wraps `self.base` needs of Keras to behave as its base.

`SAMModel` changes how a model trains, nothing else. `BaseWrapper`, a base
class of it before `keras.Model`, makes the wrapper take its data (a
KerasHub task's preprocessed as the task does), call, build, compute its
loss, export and save as the wrapped model: `.weights.h5` files in the
base model's layout (the wrapper's own state under `sam_model/`), the
exported artifact of the base (of a subclass's own `call`), and optimizers
named by their public class.
Its train function is made after Keras' global seed generator and, on
JAX, keeps the weights when a step raises. The private Keras code this
takes is in `keras_sam.compat`.
"""

import inspect
import warnings

import keras
from keras import tree

from keras_sam import compat

_WEIGHTS_SUFFIXES = (".weights.h5", ".weights.json")


def overrides(model, method):
    """Whether `model`'s class overrides `keras.Model`'s `method`."""
    return getattr(type(model), method) is not getattr(keras.Model, method)


# Methods of `keras.Model` that the wrapper's steps replace: an override in
# the base would be ignored. JAX's trainer reaches the loss through the two
# `*compute_loss*` hooks of the model whose step runs, the wrapper; the
# other trainers call neither.
_LOSS_HOOKS = (
    ("compute_loss_and_updates", "stateless_compute_loss")
    if keras.backend.backend() == "jax"
    else ()
)
TRAIN_STEPS = ("train_step", "compute_metrics", *_LOSS_HOOKS)
TEST_STEPS = ("test_step", "compute_metrics", *_LOSS_HOOKS)


def _loss_config(loss):
    # A loss's repr may leave out how two differ (their reduction). One
    # that does not serialize (a `functools.partial`) stands as itself.
    try:
        return keras.saving.serialize_keras_object(loss)
    except Exception:
        return loss


def _same_loss(loss, other):
    # Equal configurations (`xent()` twice) are one loss.
    return loss is other or _loss_config(loss) == _loss_config(other)


def _check_loss_used(wrapper):
    # At `fit`, not `compile`: Keras skips an overridden `compile` when a
    # file loads.
    loss = getattr(wrapper, "loss", None)
    base_loss = getattr(wrapper.base, "loss", None)
    if (
        overrides(wrapper.base, "compute_loss")
        and loss is not None
        and base_loss is not None
        and not _same_loss(loss, base_loss)
    ):
        warnings.warn(
            "`base` overrides `compute_loss` and was compiled with its own "
            "loss, which its `super().compute_loss` computes: the `loss` "
            "given to `SAMModel.compile` is not used. Compile only one of "
            f"them. Received: loss={_loss_config(loss)}, base="
            f"{wrapper.base.name!r} compiled with loss="
            f"{_loss_config(base_loss)}"
        )


def check_steps(base, steps, task):
    """Raises if `base` overrides one of `steps`, which the wrapper
    replaces with its own for `task` (the override would be ignored).

    Checked when a train or test function is made (and when `fit` starts
    with validation data), not when the wrapper is made, so that a model
    saved before the check still loads and predicts.
    """
    replaced = [m for m in steps if overrides(base, m)]
    if replaced:
        raise ValueError(
            f"`base` overrides `{'`, `'.join(replaced)}`, which `SAMModel` "
            f"replaces with its own for {task}, so the override would be "
            "ignored. A custom objective belongs in `compute_loss`, which "
            "both SAM passes and `evaluate` call. Received: "
            f"base={base.name!r} of type {type(base).__name__}"
        )


def check_base(base):
    """Raises unless `base` is a Keras model that is not itself a wrapper."""
    if not isinstance(base, keras.Model):
        raise ValueError(
            "`base` must be a Keras model (an instance of `keras.Model`). "
            f"Received: base={base!r} of type {type(base).__name__}"
        )
    if isinstance(base, BaseWrapper):
        name = type(base).__name__
        raise ValueError(
            f"`base` is already a {name}; wrap its base model instead, "
            f"`{name}(model.base, ...)`. Received: "
            f"base={base.name!r} of type {name}"
        )


def input_shape_of(model):
    """The input shape (a structure of shapes) of a built `model`: its
    inputs' for a functional model, else the one its build recorded."""
    try:
        return tree.map_structure(lambda t: t.shape, model.input)
    except (AttributeError, ValueError):  # no functional inputs
        return (model.get_build_config() or {}).get("input_shape")


class BaseWrapper:
    """A `keras.Model` that calls, builds, exports and saves as `self.base`.

    A subclass sets `self.base` in `__init__` and builds its own state in
    `_build_variant_state`, which `build` calls once the base is built. A
    subclass of it that overrides `call` builds, predicts and exports
    through that `call`, as a subclass of `keras.Model`.
    """

    def _build_variant_state(self):
        pass

    def call(self, inputs, training=None):
        return self.base(inputs, training=training)

    def build(self, input_shape=None):
        if not self.base.built:
            if input_shape is None:
                self.base.build(input_shape)
            else:
                self._build_base(
                    tree.map_shape_structure(keras.KerasTensor, input_shape)
                )
        self._build_variant_state()
        if input_shape is not None and self._overrides_call():
            self._build_own_layers(input_shape)
        self.built = True

    def _overrides_call(self):
        # A subclass's `call` may use layers of its own.
        return type(self).call is not BaseWrapper.call

    def _build_own_layers(self, input_shape):
        # By a symbolic call, as Keras builds a subclassed model, and as
        # Keras, at the first call where `call` cannot run symbolically.
        inputs = tree.map_shape_structure(keras.KerasTensor, input_shape)
        kwargs = {}
        if "training" in inspect.signature(self.call).parameters:
            kwargs["training"] = False
        try:
            self.call(inputs, **kwargs)
        except Exception:
            pass

    def _build_if_base_built(self):
        """Builds now where Keras' `build` recorded the base's input shape,
        so that a file's weights load; not where a subclass's `call` may
        use layers that its `__init__` makes after this: those build in
        `build_from_config` (loading a file), before `save_weights` or
        `load_weights`, or on the first batch."""
        if not self._overrides_call():
            self._built_for_files()

    def _built_for_files(self):
        """Whether the model is built, building it first where its base is
        built: a weights file holds a subclass's own layers too."""
        if not self.built and self.base.built:
            self.build(input_shape_of(self.base))
        return self.built

    def _build_base(self, inputs):
        # A first call on symbolic inputs builds the base as Keras does: a
        # subclassed model has no `build` of its own to call.
        self.base(inputs, training=False)

    def _build_from_batch(self, x):
        # Keras builds a model at its first call, inside the first step; the
        # SAM step needs the weights before its clean pass.
        specs = tree.map_structure(
            lambda t: (
                None if t is None else keras.KerasTensor(t.shape, t.dtype)
            ),
            x,
        )
        if not self.base.built:
            self._build_base(specs)
        self.build(
            tree.map_structure(lambda t: None if t is None else t.shape, specs)
        )

    @property
    def metrics(self):
        """Keras' metrics of the wrapper, then the base's own trackers
        (`compat.own_metrics`), so that `fit` and `evaluate` update and log
        them as a plain `fit` of the base does."""
        metrics = super().metrics
        base = getattr(self, "base", None)
        if base is None:
            return metrics
        seen = {id(m) for m in metrics}
        # A base whose `compute_loss` runs its own compiled loss updates
        # that loss's per-output trackers.
        own = compat.own_metrics(base, overrides(base, "compute_loss"))
        return metrics + [m for m in own if id(m) not in seen]

    @property
    def output_names(self):
        """The base model's output names: `compile` matches losses and
        metrics given by name to a list of outputs, and names their logs,
        by them. An AttributeError, as Keras expects, if the base has none
        (a subclassed model)."""
        return self.base.output_names

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """`base.compute_loss` if the base overrides it, else Keras' own."""
        if not overrides(self.base, "compute_loss"):
            return super().compute_loss(
                x, y, y_pred, sample_weight, training=training
            )
        try:
            return compat.compute_loss_with(
                self.base, self, x, y, y_pred, sample_weight, training=training
            )
        except AttributeError as error:
            if not overrides(self.base, "compile"):
                raise
            # Keras' `Distiller` reads what its own `compile` sets, which
            # the wrapper's `compile` (and loading a file) does not call.
            raise ValueError(
                f"`base.compute_loss` failed ({error}); `base` overrides "
                "`compile`, whose settings its loss may read. Compile it "
                "with its own arguments (`base.compile(...)`; its optimizer "
                "is not used), also after loading, then compile the "
                f"`SAMModel`. Received: base={self.base.name!r} of type "
                f"{type(self.base).__name__}"
            ) from error

    # A multi-worker-safe build (keras-team/keras#20585): see compat.
    _maybe_symbolic_build = compat.maybe_symbolic_build
    _lock_state = compat.keep_state_open

    def make_train_function(self, force=False):
        """Keras' train function, made after Keras' global seed generator
        (a traced step must hold it: `compat.stateful_variables`); on JAX,
        one that keeps the weights when a step raises
        (`compat.restoring_state_on_error`)."""
        check_steps(self.base, TRAIN_STEPS, "training")
        _check_loss_used(self)
        compat.stateful_variables(self, create=True)
        super().make_train_function(force)
        self.train_function = compat.restoring_state_on_error(
            self, self.train_function
        )
        return self.train_function

    def make_test_function(self, force=False):
        check_steps(self.base, TEST_STEPS, "evaluation")
        return super().make_test_function(force)

    def _prepared(self, method, args, kwargs):
        """The arguments of `keras.Model.<method>`, by name, as a KerasHub
        pipeline base prepares them (`compat.pipeline_arguments`): batched
        and preprocessed, as the base's own `<method>` would."""
        bound = inspect.signature(getattr(super(), method)).bind(
            *args, **kwargs
        )
        arguments = bound.arguments
        arguments.update(arguments.pop("kwargs", {}))
        return compat.pipeline_arguments(self.base, method, arguments)

    def fit(self, *args, **kwargs):
        arguments = self._prepared("fit", args, kwargs)
        if arguments.get("validation_data") is not None or arguments.get(
            "validation_split"
        ):
            # Now, not after the first epoch's training.
            check_steps(self.base, TEST_STEPS, "evaluation")
        return super().fit(**arguments)

    def evaluate(self, *args, **kwargs):
        return super().evaluate(**self._prepared("evaluate", args, kwargs))

    def train_on_batch(self, *args, **kwargs):
        arguments = self._prepared("train_on_batch", args, kwargs)
        return super().train_on_batch(**arguments)

    def test_on_batch(self, *args, **kwargs):
        arguments = self._prepared("test_on_batch", args, kwargs)
        return super().test_on_batch(**arguments)

    def predict(self, *args, **kwargs):
        """The base model's predictions: through its own `predict_step`
        when it has one (decoded outputs, say), then with the base's
        compile settings (Keras' `predict` on the base), unless a subclass
        overrides `predict_step` or `call`, whose are used, as Keras'."""
        arguments = self._prepared("predict", args, kwargs)
        if self._predicts_as_base():
            return keras.Model.predict(self.base, **arguments)
        return super().predict(**arguments)

    def predict_on_batch(self, *args, **kwargs):
        """`predict_on_batch`, through the base's `predict_step` as
        `predict`."""
        arguments = self._prepared("predict_on_batch", args, kwargs)
        if self._predicts_as_base():
            return keras.Model.predict_on_batch(self.base, **arguments)
        return super().predict_on_batch(**arguments)

    def _predicts_as_base(self):
        # Through the base's own `predict_step`, unless a subclass has its
        # own `predict_step` or `call`, as a plain Keras subclass would.
        return (
            overrides(self.base, "predict_step")
            and not overrides(self, "predict_step")
            and not self._overrides_call()
        )

    def export(
        self,
        filepath,
        format="tf_saved_model",
        verbose=None,
        input_signature=None,
        **kwargs,
    ):
        """Exports the base model for inference: see `keras.Model.export`.

        The artifact is the one `model.base.export(...)` writes, with the
        base model's serving signature; SAM only changes training. A
        subclass that overrides `call` exports its own `call`.
        """
        export = self.base.export
        if self._overrides_call():
            export = super().export
        return export(
            filepath,
            format=format,
            verbose=verbose,
            input_signature=input_signature,
            **kwargs,
        )

    def save_weights(self, filepath, overwrite=True, max_shard_size=None):
        """Saves the weights in the layout of `model.base.save_weights`.

        The file loads into the bare base model with
        `base.load_weights(filepath)`, and into a `SAMModel` (with the
        optimizer's and the variants' state, kept in a `sam_model` group
        that the base model ignores). As in Keras, the optimizer's state
        loads only into a built optimizer: after `compile`, call
        `model.optimizer.build(model.trainable_variables)` before
        `load_weights`, or Keras skips it with a warning. See
        `keras.Model.save_weights`.
        """
        path = str(filepath)
        if not path.endswith(_WEIGHTS_SUFFIXES) or not self._built_for_files():
            return super().save_weights(filepath, overwrite, max_shard_size)
        compat.save_weights(self, path, overwrite, max_shard_size)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Loads weights saved by a `SAMModel` or by its base model.

        A file written by `model.base.save_weights` loads into the base,
        and the optimizer state of a compiled base's file into this model's
        optimizer. See `keras.Model.load_weights`.
        """
        path = str(filepath)
        if (
            not kwargs
            and path.endswith(_WEIGHTS_SUFFIXES)
            and self._built_for_files()
        ):
            if compat.weights_file_has_path(path, compat.SAM_STATE):
                return compat.load_weights(self, path, skip_mismatch)
            if not compat.weights_file_has_path(path, "base"):
                return compat.load_base_weights(self, path, skip_mismatch)
        return super().load_weights(
            filepath, skip_mismatch=skip_mismatch, **kwargs
        )

    def get_compile_config(self):
        return compat.public_optimizer_classes(super().get_compile_config())

    def compile_from_config(self, config):
        # Files that an earlier version saved on PyTorch name its classes.
        super().compile_from_config(compat.public_optimizer_classes(config))
