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
import threading
import types
import weakref

import torch


def train_step(model, step, data):
    """`step(data)`; traced by `torch.compile`, eagerly with compiled passes.

    Under `jit_compile=True` Keras traces the step with `torch.compile`;
    the step then leaves the trace and compiles its passes instead (see the
    module's docstring). Called eagerly, it runs eagerly.
    """
    if torch.compiler.is_compiling():
        return _step_with_compiled_passes(model, step, data)
    return step(data)


# `.compiled_pass`: that of the model whose step runs in this thread (two
# threads may each run a `fit`), `None` outside one.
_running = threading.local()
_compiled_by_model = weakref.WeakKeyDictionary()


@torch.compiler.disable
def _step_with_compiled_passes(model, step, data):
    compiled = _compiled_by_model.get(model)
    if compiled is None or compiled.compile is not torch.compile:
        compiled = _compiled_copy_of_pass()
        _compiled_by_model[model] = compiled
    _running.compiled_pass = compiled
    try:
        return step(data)
    finally:
        _running.compiled_pass = None


def _compiled_copy_of_pass():
    """`torch.compile` of a copy of `_pass` with code of its own.

    Dynamo keeps at most 8 programs of one code object per process
    (`torch._dynamo.config.recompile_limit`), for all models together,
    and then runs it uncompiled with only a warning: each model takes one
    or two (a second batch size compiles again, then dynamically), so a
    process that trained several models ran the later ones' passes
    uncompiled. A copy of the code per model gives each its own 8.
    Made once per model (a `torch.compile` takes ~2 ms), and again if
    `torch.compile` has been replaced (a test counts the graphs so).
    """
    code = _pass.__code__.replace()
    compiled = torch.compile(types.FunctionType(code, _pass.__globals__))
    return types.SimpleNamespace(
        call=compiled, compile=torch.compile, code=code
    )


def compiled_pass(fn):
    """`fn` through the model's compiled `_pass`, in a compiling step.

    Outside such a step, `fn` itself.
    """
    compiled = getattr(_running, "compiled_pass", None)
    if compiled is None:
        return fn
    return functools.partial(compiled.call, fn)


def _pass(fn, weights):
    # Dynamo guards on `fn`'s code and on what its closure holds (the
    # model, the batch, the state), not on the closure itself, which each
    # pass makes afresh: both passes of every step reuse what the first
    # step compiled.
    return fn(weights)
