"""PyTorch under `jit_compile=True`: the SAM step compiles its passes.

Keras hands the whole step to `torch.compile`. Traced whole, the SAM step
did not compile once: the torch random state (read and restored around the
perturbed pass) cannot be traced, a run-time
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

import torch


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


# Whether `compiled_pass` compiles: set while
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


def compiled_pass(fn):
    """`fn` through `torch.compile(_pass)` while a step compiles its passes.

    The compiled `_pass` is made once (making it takes ~2 ms a call), keyed
    by `torch.compile` itself, which a test may replace to count the graphs.
    Outside such a step, `fn` itself.
    """
    if not _compiling_passes:
        return fn
    if torch.compile not in _compiled:
        _compiled.clear()
        _compiled[torch.compile] = torch.compile(_pass)
    return functools.partial(_compiled[torch.compile], fn)


def _pass(fn, weights):
    # Dynamo guards on `fn`'s code and on what its closure holds (the
    # model, the batch, the state), not on the closure itself, which each
    # pass makes afresh: both passes of every step reuse what the first
    # step compiled.
    return fn(weights)
