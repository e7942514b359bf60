"""The settings of a SAM step: each option, its default and its check, once.

`SAMOptions` is what `SAMModel(base, **options)` and `sam_gradients(...,
**options)` take, what `compute_sam_gradients` reads and what a `SAMModel`'s
config stores. Each field's `metadata["help"]` says what it means, so that a
command line can be derived from the fields instead of repeating them.
"""

import dataclasses
import math
import numbers
import re
import textwrap
import weakref

import keras
import numpy as np
from keras import ops

from keras_sam import backend
from keras_sam import switching as switching_lib


def _option(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class SAMOptions:
    """The options of a SAM step, validated when made.

    Each check raises a `ValueError` naming the argument and the value.
    Numbers are stored as Python `float`, `int` and `bool`.
    """

    rho: object = _option(
        0.05,
        "The neighbourhood radius ρ >= 0: a number, a schedule of the step "
        "(evaluated at the step the optimizer's learning-rate schedule "
        "sees) or a float keras.Variable read at every step (a callback "
        "may set it; saved with the weights, and a config makes a new "
        "Variable of its value); 0 is the base optimizer. "
        "A schedule is called at step 0 when the options are made, so a "
        "wrong one fails there; a schedule or Variable ρ that is negative "
        "or NaN at a SAM step makes its ε, sharpness and update NaN, "
        "which the logs (and TerminateOnNaN) show. "
        "ASAM typically wants a ρ about 10 times SAM's.",
    )
    adaptive: bool = _option(False, "ASAM's scale-invariant ε.")
    eta: float = _option(
        0.01,
        "ASAM's η >= 0, added to |w|; η > 0 keeps weights at zero "
        "perturbable (the ASAM authors' CIFAR example and davda54/sam use 0).",
    )
    adaptive_variables: str = _option(
        "weights",
        "With adaptive: 'weights' (T = |w| + η on every trainable variable "
        "but biases and normalization offsets, named bias or beta, which "
        "get T = 1, as the ASAM authors' code) or 'all' (T = |w| + η on "
        "every one; with eta=0, davda54/sam's ASAM).",
    )
    sync_perturbations: bool = _option(
        False,
        "All-reduce the clean gradient across replicas (devices) before "
        "computing ε: one ε for the global batch.",
    )
    micro_batches: int = _option(
        1,
        "Parts of each replica's batch, each with its own ε (m-sharpness).",
    )
    gsam_alpha: float = _option(0.0, "GSAM's α >= 0; 0 is SAM.")
    perturbed_variables: object = _option(
        "all",
        "Which trainable variables ε perturbs: 'all', 'normalization' "
        "(SAM-ON) or a list of regular expressions searched in each "
        "variable's path.",
    )
    switching: object = _option(
        None,
        "A keras_sam.switching.SwitchingPolicy choosing the steps that run "
        "SAM, or None for every step.",
    )
    looksam_alpha: object = _option(
        None,
        "LookSAM's α >= 0 for the steps a switching policy declines, or "
        "None for the plain clean gradient there.",
    )
    perturbation: str = _option(
        "gradient",
        "'gradient' (SAM: ε along the clean gradient), 'momentum' "
        "(Momentum-SAM: ε along the optimizer's momentum, one pass) or "
        "'friendly' (F-SAM: ε along g − σ m, m a moving average of g).",
    )
    friendly_sigma: float = _option(
        1.0,
        "F-SAM's σ >= 0, the share of the gradients' moving average "
        "removed from g before ε; 0 is SAM.",
    )
    friendly_decay: float = _option(
        0.9,
        "F-SAM's λ in [0, 1), the decay of the moving average of the "
        "clean gradients (the authors use 0.6 to 0.95).",
    )

    def __post_init__(self):
        for name, value in _checked(self).items():
            object.__setattr__(self, name, value)

    @property
    def takes_two_passes(self):
        """Whether a step may run the perturbed pass after the clean one."""
        return self.perturbation != "momentum" and not (
            isinstance(self.rho, float) and self.rho == 0
        )

    def as_kwargs(self):
        """The options by name, the objects themselves (not copies)."""
        return {name: getattr(self, name) for name in NAMES}

    def get_config(self):
        """The options as a config: a Variable ρ as `{"variable": value,
        "dtype": dtype}`, a schedule and a policy serialized."""
        config = self.as_kwargs()
        if isinstance(self.rho, keras.Variable):
            config["rho"] = {
                "variable": float(ops.convert_to_numpy(self.rho)),
                "dtype": str(self.rho.dtype),
            }
        elif not isinstance(self.rho, float):
            config["rho"] = keras.saving.serialize_keras_object(self.rho)
        if self.switching is not None:
            config["switching"] = keras.saving.serialize_keras_object(
                self.switching
            )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Options from `get_config`'s config; a Variable ρ comes back as a
        new non-trainable Variable (`model.rho`, for callbacks to assign).
        A config written before Variables were kept holds a float."""
        config = dict(config)
        rho = config.get("rho")
        if isinstance(rho, dict) and "variable" in rho:
            config["rho"] = keras.Variable(
                rho["variable"], dtype=rho["dtype"], trainable=False
            )
        for name in ("rho", "switching"):
            if isinstance(config.get(name), dict):
                config[name] = keras.saving.deserialize_keras_object(
                    config[name], custom_objects=custom_objects
                )
        return cls(**config)


def save_rho(rho, store):
    """Writes a Variable ρ's value under `rho` in the model's own store of
    a weights file, beside its variables: a callback may have changed it,
    and a resumed run must go on from there, as from an optimizer's
    learning rate."""
    if isinstance(rho, keras.Variable):
        store["rho"] = rho


def load_rho(rho, store, load_rest):
    """`load_rest` of the store without its `rho`, then assigns that to a
    Variable ρ: a state that does not load leaves ρ as it was."""
    keys = list(store.keys())
    if "rho" not in keys:
        # No Variable ρ, or a file written before one was kept.
        load_rest(store)
        return
    load_rest({key: store[key] for key in keys if key != "rho"})
    if isinstance(rho, keras.Variable):
        rho.assign(store["rho"])


def fields():
    return dataclasses.fields(SAMOptions)


def fixed_option_message(name, value):
    """The message for assigning `SAMModel.<name>` once the model is made:
    the step and the saved config read the options, which are frozen."""
    kwargs = f"{{**model.options.as_kwargs(), '{name}': ...}}"
    if name == "options":
        kwargs = "new_options.as_kwargs()"
    return (
        f"`SAMModel.{name}` is fixed when the model is made. Received: "
        f"{name}={value!r}. To change ρ while training, make the model with "
        "`rho=keras.Variable(...)` (or a schedule) and assign the Variable; "
        "for other options, make a new SAMModel on the same base: "
        f"`SAMModel(model.base, **{kwargs})`."
    )


def args_doc(indent):
    """The options as the `Args:` entries of a docstring, each with its
    help and its default, indented by `indent` spaces."""
    pad = " " * indent
    return "\n".join(
        textwrap.fill(
            f"{f.name}: {f.metadata['help']} Defaults to `{f.default!r}`.",
            width=80,
            initial_indent=pad,
            subsequent_indent=pad + "    ",
        )
        for f in fields()
    )


NAMES = tuple(f.name for f in fields())
# `SAMModel`'s attributes that the step and the saved config read.
GUARDED = (*NAMES, "options")


def _checked(options):
    """The normalized values of `options`' fields; raises on a bad one."""
    rho = _checked_rho(options.rho)
    eta = checked_number("eta", options.eta, minimum=0)
    micro_batches = checked_integer("micro_batches", options.micro_batches, 1)
    for name in ("adaptive", "sync_perturbations"):
        value = scalar_of(getattr(options, name))
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(
                f"`{name}` must be True or False. Received: {name}={value!r}"
            )
    if options.sync_perturbations and micro_batches > 1:
        raise ValueError(
            "`sync_perturbations=True` computes one ε for the whole global "
            "batch, so it cannot be combined with `micro_batches` > 1. "
            f"Received: micro_batches={micro_batches}"
        )
    if options.adaptive_variables not in ("weights", "all"):
        raise ValueError(
            "`adaptive_variables` must be 'weights' or 'all'. Received: "
            f"adaptive_variables={options.adaptive_variables!r}"
        )
    gsam_alpha = checked_number("gsam_alpha", options.gsam_alpha, minimum=0)
    perturbed_variables = _checked_patterns(options.perturbed_variables)
    switching = options.switching
    if switching is not None and not isinstance(
        switching, switching_lib.SwitchingPolicy
    ):
        raise ValueError(
            "`switching` must be None or a keras_sam.switching."
            f"SwitchingPolicy. Received: switching={switching!r}"
        )
    looksam_alpha = options.looksam_alpha
    if looksam_alpha is not None:
        looksam_alpha = checked_number(
            "looksam_alpha", looksam_alpha, minimum=0
        )
        if switching is None:
            raise ValueError(
                "`looksam_alpha` acts on the steps without SAM, so it needs "
                "a `switching` policy, e.g. keras_sam.switching.Periodic(5)."
                f" Received: looksam_alpha={looksam_alpha}, switching=None"
            )
        if micro_batches > 1:
            raise ValueError(
                "`looksam_alpha` stores one direction per step and cannot "
                f"be combined with micro_batches={micro_batches}."
            )
    _check_perturbation(options)
    friendly_sigma = checked_number(
        "friendly_sigma", options.friendly_sigma, minimum=0
    )
    friendly_decay = checked_number(
        "friendly_decay", options.friendly_decay, minimum=0
    )
    if not friendly_decay < 1:
        raise ValueError(
            "`friendly_decay` must be < 1 (λ = 1 would keep the first "
            f"gradient forever). Received: friendly_decay={friendly_decay}"
        )
    if options.perturbation != "friendly":
        for name, value in (
            ("friendly_sigma", friendly_sigma),
            ("friendly_decay", friendly_decay),
        ):
            if value != _DEFAULTS[name]:
                raise ValueError(
                    f"`{name}` acts with `perturbation='friendly'` (F-SAM) "
                    f"only. Received: {name}={value}, "
                    f"perturbation={options.perturbation!r}"
                )
    return dict(
        rho=rho,
        adaptive=bool(options.adaptive),
        eta=eta,
        sync_perturbations=bool(options.sync_perturbations),
        micro_batches=micro_batches,
        gsam_alpha=gsam_alpha,
        perturbed_variables=perturbed_variables,
        looksam_alpha=looksam_alpha,
        friendly_sigma=friendly_sigma,
        friendly_decay=friendly_decay,
    )


def _checked_rho(rho):
    """ρ as a float, or the Variable or schedule it is."""
    if isinstance(rho, keras.Variable):
        if tuple(rho.shape) != () or "float" not in str(rho.dtype):
            raise ValueError(
                "A `keras.Variable` `rho` must be a float scalar. Received: "
                f"rho={rho!r} of shape {tuple(rho.shape)} and dtype "
                f"{rho.dtype}"
            )
        if not backend.is_symbolic(rho.value):
            # The variable, not its `.value`: made in a tf.distribute
            # scope, that is a per-replica value NumPy cannot read.
            # As float32, which prints as written (and takes bfloat16).
            value = ops.convert_to_numpy(rho).astype("float32")[()]
            checked_number("rho", value, 0)
        return rho
    if callable(rho):
        return _checked_schedule(rho)
    rho = scalar_of(rho)
    if not is_real(rho):
        raise ValueError(
            "`rho` must be a number >= 0, a float `keras.Variable` or a "
            f"schedule. Received: rho={rho!r}"
        )
    return checked_number("rho", rho, minimum=0)


def _checked_schedule(rho):
    """A schedule `rho`, called at step 0 so that a wrong one fails here,
    naming it, and not in the first step's trace with the backend's words
    (a value it returns later is checked in `schedules.current_rho`)."""
    expected = (
        "A schedule `rho` is called with the step (an integer scalar) and "
        "must return ρ, a float scalar >= 0"
    )
    if isinstance(rho, type):
        raise ValueError(
            f"{expected}: pass an instance, not a class. Received: rho={rho!r}"
        )
    if rho in _checked_schedules:
        return rho  # `sam_gradients` makes the options at every step.
    try:
        value = rho(ops.convert_to_tensor(0))
    except Exception as error:
        raise ValueError(
            f"{expected}. It is called at step 0 when the model is made, "
            f"before `compile` (to follow the learning rate, use "
            f"`schedules.RhoFollowingLearningRate`), and it raised "
            f"{type(error).__name__}: {error}. Received: rho={rho!r}"
        ) from error
    if isinstance(value, keras.Variable):
        value = value.value
    if not is_real(value):
        is_number = (
            ops.is_tensor(value) or isinstance(value, np.ndarray)
        ) and (
            keras.backend.is_float_dtype(value.dtype)
            or keras.backend.is_int_dtype(value.dtype)
        )
        if not is_number or tuple(value.shape) != ():
            raise ValueError(
                f"{expected}. At step 0 it returned {value!r}. Received: "
                f"rho={rho!r}"
            )
        if backend.is_symbolic(value):
            return rho
        value = float(ops.convert_to_numpy(value))
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"{expected}. At step 0 it returned {value}. Received: rho={rho!r}"
        )
    try:
        _checked_schedules.add(rho)
    except TypeError:
        pass  # Not weakly referable: checked again next time.
    return rho


_checked_schedules = weakref.WeakSet()


def checked_integer(name, value, minimum):
    """`value` as an int >= `minimum` (a Python or NumPy integer, not a
    boolean)."""
    value = scalar_of(value)
    if (
        not isinstance(value, numbers.Integral)
        or isinstance(value, (bool, np.bool_))
        or value < minimum
    ):
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}. "
            f"Received: {name}={value!r}"
        )
    return int(value)


def checked_number(name, value, minimum=None, strict=False):
    """`value` as a finite float, >= `minimum` (> with `strict`) if given."""
    relation = ">" if strict else ">="
    bound = "" if minimum is None else f" {relation} {minimum}"
    value = scalar_of(value)
    if not is_real(value):
        raise ValueError(
            f"`{name}` must be a number{bound}. Received: {name}={value!r}"
        )
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite. Received: {name}={value!s}")
    if minimum is None:
        return float(value)
    if not (value > minimum if strict else value >= minimum):
        raise ValueError(
            f"`{name}` must be {relation} {minimum}. Received: {name}={value!s}"
        )
    return float(value)


def _checked_patterns(perturbed_variables):
    if isinstance(perturbed_variables, str):
        if perturbed_variables not in ("all", "normalization"):
            raise ValueError(
                "`perturbed_variables` must be 'all', 'normalization' or a "
                "list of regular expressions. Received: "
                f"perturbed_variables={perturbed_variables!r}"
            )
        return perturbed_variables
    if not perturbed_variables or not all(
        isinstance(p, str) for p in perturbed_variables
    ):
        raise ValueError(
            "`perturbed_variables` must be 'all', 'normalization' or a "
            "non-empty list of regular expressions. Received: "
            f"perturbed_variables={perturbed_variables!r}"
        )
    for pattern in perturbed_variables:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(
                "`perturbed_variables` must hold regular expressions; "
                f"{pattern!r} is not one ({error}). Received: "
                f"perturbed_variables={perturbed_variables!r}"
            ) from None
    return list(perturbed_variables)


def _check_perturbation(options):
    if options.perturbation not in tuple(_EXCLUDED):
        raise ValueError(
            "`perturbation` must be 'gradient' (SAM), 'momentum' "
            "(Momentum-SAM) or 'friendly' (F-SAM). Received: "
            f"perturbation={options.perturbation!r}"
        )
    excluded, reason = _EXCLUDED[options.perturbation]
    for name in excluded:
        value = getattr(options, name)
        if value != _DEFAULTS[name]:
            raise ValueError(
                f"`perturbation={options.perturbation!r}` cannot be combined"
                f" with `{name}` ({reason}). Received: {name}={value!r}"
            )


# What each perturbation cannot be combined with, and why.
_EXCLUDED = {
    "gradient": ((), ""),
    "momentum": (
        (
            "adaptive",
            "sync_perturbations",
            "micro_batches",
            "gsam_alpha",
            "switching",
            "looksam_alpha",
        ),
        "Momentum-SAM has no clean gradient and one ε",
    ),
    "friendly": (
        ("micro_batches", "switching", "looksam_alpha"),
        "F-SAM keeps one moving average of the whole batch's clean "
        "gradient and perturbs at every step",
    ),
}


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SAMOptions)}


def scalar_of(value):
    """A concrete 0-d tensor or array as its NumPy scalar, as Keras'
    optimizers take a tensor learning rate; anything else as it is."""
    if (
        (ops.is_tensor(value) or isinstance(value, np.ndarray))
        # A variable, Keras' or TensorFlow's, may change: never read once.
        and not hasattr(value, "assign")
        and not backend.is_symbolic(value)
        and tuple(value.shape) == ()
    ):
        return ops.convert_to_numpy(value)[()]
    return value


def is_real(value):
    """A Python or NumPy real number, not a boolean."""
    return isinstance(value, numbers.Real) and not isinstance(
        value, (bool, np.bool_)
    )
