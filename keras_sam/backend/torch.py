"""The PyTorch backend: `torch.autograd.grad` on detached copies.

Keras' PyTorch trainer runs the step eagerly, or through `torch.compile`
with `jit_compile=True`, and has no `keras.distribution` support, so a
conditional is a Python `if` and there is one replica. Several processes
of `torch.distributed` are refused: gradients taken with
`torch.autograd.grad` bypass the all-reduce hooks of
`DistributedDataParallel`, so each process would train alone.

**`jit_compile=True`.** Keras hands the whole step to `torch.compile`.
Traced whole, the SAM step did not compile once: the torch random state
(read and restored around the perturbed pass) cannot be traced, a run-time
conditional is data-dependent, and `keras.ops.cond` names each call from a
global counter that the compiled code is guarded on, so the step
recompiled on each of the next steps until dynamo's recompile limit and
then ran uncompiled. So `train_step` takes the step out of the trace
(`torch.compiler.disable`) and compiles its passes instead: each pass's
forward pass and loss, with its backward pass, through `torch.compile`,
the same compiled code for the clean and the perturbed pass. The rest of
the step (ε, the random state, the optimizer's update, the metrics) runs
eagerly between them. The passes compile on the first step and not again
while the shapes stay the same; on a model with BatchNorm and dropout
that is fewer graphs than Keras' compiled plain step
(`tests/torch_backend_test.py`).
"""

import functools

import keras
import torch
from keras import tree


def _leaves(weights):
    # Fresh leaves that share the weights' storage: the graph of a pass
    # starts here and never reaches the model's parameters.
    return [torch.as_tensor(w).detach().requires_grad_(True) for w in weights]


def _detached(structure):
    # What leaves a pass keeps no autograd graph alive until the next step.
    return tree.map_structure(
        lambda t: t.detach() if isinstance(t, torch.Tensor) else t, structure
    )


def _check_single_process():
    if not torch.distributed.is_available():
        return
    if not torch.distributed.is_initialized():
        return
    world_size = torch.distributed.get_world_size()
    if world_size > 1:
        raise RuntimeError(
            "keras_sam on PyTorch trains on one device: torch.distributed "
            f"is initialized with world_size={world_size}, and the SAM "
            "step's gradients (torch.autograd.grad) bypass the all-reduce "
            "of DistributedDataParallel, so each process would train its "
            "own model. Use KERAS_BACKEND=jax (keras.distribution) or "
            "tensorflow (tf.distribute) for several devices."
        )


def value_and_gradients(fn, weights):
    _check_single_process()
    weights = _leaves(weights)
    if _compiling_passes:
        fn = functools.partial(_compiled_pass(), fn)
    with torch.enable_grad():
        objective, aux = fn(weights)
        gradients = torch.autograd.grad(objective, weights, allow_unused=True)
    # `None` where the objective does not depend on a weight, as Keras'
    # PyTorch trainer leaves `.grad`.
    return _detached(aux), list(gradients)


def hessian_vector_product(fn, weights, vector):
    """`∇²fn(weights) · vector` by double backpropagation."""
    weights = _leaves(weights)
    with torch.enable_grad():
        objective = fn(weights)
        grads = torch.autograd.grad(objective, weights, create_graph=True)
        dot = sum(torch.sum(g * v) for g, v in zip(grads, vector))
        products = torch.autograd.grad(dot, weights, allow_unused=True)
    return [
        torch.zeros_like(w) if p is None else p.detach()
        for p, w in zip(products, weights)
    ]


def sum_duplicate_rows(tensors):
    # Gradients here are dense, also those of an embedding table.
    return list(tensors)


def to_dense(tensors):
    return list(tensors)


def function(fn):
    return fn


def cond(predicate, true_fn, false_fn):
    return true_fn() if bool(predicate) else false_fn()


def replica_count():
    return 1


def data_parallel_shards():
    return 1


def all_reduce(tensors, op="sum"):
    del op
    return list(tensors)


def check_per_replica_call(name):
    del name


def is_symbolic(tensor):
    del tensor
    return False


def is_multi_worker(strategy=None):
    # Several processes are one `keras.distribution` mesh here, which
    # Keras' own trainer handles.
    del strategy
    return False


def first_local_batch(strategy, iterator):
    del strategy, iterator
    return None


def random_state():
    # Keras' unseeded `Dropout` draws from torch's default generators, not
    # from a seed variable that the step could hand to both passes.
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    )
    return torch.get_rng_state(), cuda


def set_random_state(state):
    # `as_tensor`: also from the NumPy arrays a checkpoint holds.
    cpu, cuda = state
    torch.set_rng_state(torch.as_tensor(cpu))
    if cuda is not None:
        torch.cuda.set_rng_state_all([torch.as_tensor(s) for s in cuda])


def read_live(variable):
    return keras.ops.cast(variable.value, "float32")


def apply_gradients(optimizer, gradients, variables, after_gradients=False):
    del after_gradients  # eager: the update runs after the gradients
    with torch.no_grad():
        optimizer.apply(list(gradients), list(variables))


def train_step(model, step, data):
    """`step(data)`; traced by `torch.compile`, eagerly with compiled passes.

    Under `jit_compile=True` Keras traces the step with `torch.compile`;
    the step then leaves the trace and compiles its passes instead (see the
    module's docstring). Called eagerly, it runs eagerly.
    """
    del model
    if torch.compiler.is_compiling():
        return _step_with_compiled_passes(step, data)
    return step(data)


# Whether `value_and_gradients` compiles its pass: set while
# `_step_with_compiled_passes` runs a step.
_compiling_passes = False
_compiled = {}


@torch.compiler.disable
def _step_with_compiled_passes(step, data):
    global _compiling_passes
    _compiling_passes = True
    try:
        return step(data)
    finally:
        _compiling_passes = False


def _compiled_pass():
    """`torch.compile(_pass)`, made once (making it takes ~2 ms a call).

    Keyed by `torch.compile` itself, which a test may replace to count the
    graphs.
    """
    if torch.compile not in _compiled:
        _compiled.clear()
        _compiled[torch.compile] = torch.compile(_pass)
    return _compiled[torch.compile]


def _pass(fn, weights):
    # Dynamo guards on `fn`'s code and on what its closure holds (the
    # model, the batch, the state), not on the closure itself, which each
    # pass makes afresh: both passes of every step reuse what the first
    # step compiled.
    return fn(weights)
