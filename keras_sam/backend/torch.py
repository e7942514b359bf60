"""The PyTorch backend: `torch.autograd.grad` on detached copies.

Keras' PyTorch trainer runs the step eagerly, or through `torch.compile`
with `jit_compile=True`, and has no `keras.distribution` support, so a
conditional is a Python `if` and there is one replica. Several processes
of `torch.distributed` are refused: gradients taken with
`torch.autograd.grad` bypass the all-reduce hooks of
`DistributedDataParallel`, so each process would train alone.

Under `jit_compile=True` the step compiles its passes (`torch_compile`).
"""

import torch
from keras import tree

from keras_sam.backend import torch_compile


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
    distributed = torch.distributed
    if not distributed.is_available() or not distributed.is_initialized():
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
    fn = torch_compile.compiled_pass(fn)
    with torch.enable_grad():
        objective, aux = fn(weights)
        gradients = weights and torch.autograd.grad(
            objective, weights, allow_unused=True
        )
    # `None` where the objective does not depend on a weight, as Keras'
    # PyTorch trainer leaves `.grad` (none for none: `grad` refuses them).
    return _detached(aux), list(gradients)


def hessian_vector_product(fn, weights, vector):
    """`∇²fn(weights) · vector` by double backpropagation."""
    weights = _leaves(weights)
    with torch.enable_grad():
        grads = torch.autograd.grad(
            fn(weights), weights, create_graph=True, allow_unused=True
        )
        pairs = [(g, v) for g, v in zip(grads, vector) if g is not None]
        dot = sum(torch.sum(g * v) for g, v in pairs)
        products = [None] * len(weights)  # a loss blind to, or linear in, w
        if torch.is_tensor(dot) and dot.requires_grad:
            products = torch.autograd.grad(dot, weights, allow_unused=True)
    return [
        torch.zeros_like(w) if p is None else p.detach()
        for p, w in zip(products, weights)
    ]


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


def apply_gradients(optimizer, gradients, variables, after_gradients=False):
    del after_gradients  # eager: the update runs after the gradients
    with torch.no_grad():
        optimizer.apply(list(gradients), list(variables))
