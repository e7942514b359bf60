"""What only the PyTorch backend needs: no autograd graph outlives a step,
several `torch.distributed` processes are refused, and under
`torch.compile` the step compiles once."""

import functools
import gc

import keras
import numpy as np
import pytest

import keras_sam
from tests.backends import BACKEND
from tests.sam_model_test import BATCH
from tests.sam_model_test import bn_dropout_model
from tests.sam_model_test import sgd
from tests.sam_model_test import softmax_data
from tests.sam_model_test import xent

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="PyTorch only")


def tensors_holding_a_graph():
    """Ids of the live tensors with an autograd graph, on real devices
    (tracing by earlier `torch.compile` tests leaves meta tensors)."""
    import torch

    gc.collect()
    return {
        id(o)
        for o in gc.get_objects()
        if isinstance(o, torch.Tensor)
        and o.grad_fn is not None
        and o.device.type != "meta"
        and type(o) is torch.Tensor
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rho=0.3),
        dict(rho=0.3, adaptive=True, micro_batches=2),
        dict(
            rho=0.3,
            switching=keras_sam.switching.Periodic(2),
            looksam_alpha=0.7,
        ),
        dict(rho=1.0, perturbation="momentum"),
    ],
    ids=["sam", "asam_micro_batches", "looksam", "momentum"],
)
def test_no_autograd_graph_outlives_a_step(kwargs):
    x, y, _, _ = softmax_data()
    model = keras_sam.SAMModel(bn_dropout_model(), **kwargs)
    model.compile(optimizer=sgd(), loss=xent(), metrics=["accuracy"])
    before = tensors_holding_a_graph()
    model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0)
    assert not tensors_holding_a_graph() - before
    state = model.variables + model.optimizer.variables
    state += model.metrics_variables
    assert all(v.value.grad_fn is None for v in state)


@pytest.fixture
def one_process_group(tmp_path):
    import torch

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1
    )
    yield
    torch.distributed.destroy_process_group()


def test_one_torch_distributed_process_trains(one_process_group):
    x, y, _, _ = softmax_data()
    model = keras_sam.SAMModel(keras.Sequential([keras.layers.Dense(3)]))
    model.compile(optimizer=sgd(), loss=xent())
    history = model.fit(x, y, batch_size=BATCH, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_several_torch_distributed_processes_are_refused(
    one_process_group, monkeypatch
):
    import torch

    # As a second process would see it; one process cannot run two ranks.
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    x, y, _, _ = softmax_data()
    model = keras_sam.SAMModel(keras.Sequential([keras.layers.Dense(3)]))
    model.compile(optimizer=sgd(), loss=xent())
    with pytest.raises(RuntimeError, match="world_size=2"):
        model.fit(x, y, batch_size=BATCH, verbose=0)
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        keras_sam.sam_gradients(model.base, x, y, xent())


def graphs_compiled_per_step(monkeypatch, model, steps):
    """How many graphs `torch.compile` compiled in each of `steps` steps of
    `fit` (`jit_compile=True`), each graph counted when dynamo hands it to
    the backend: a recompilation compiles its graph again."""
    import torch

    graphs = []

    def counting_backend(graph_module, example_inputs):
        del example_inputs
        graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(
        torch,
        "compile",
        functools.partial(torch.compile, backend=counting_backend),
    )
    torch._dynamo.reset()
    per_step = []

    class CountGraphs(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            per_step.append(len(graphs) - sum(per_step))

    x, y, _, _ = softmax_data()
    model.compile(optimizer=sgd(), loss=xent(), jit_compile=True)
    model.fit(
        x[: steps * BATCH],
        y[: steps * BATCH],
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
        callbacks=[CountGraphs()],
    )
    torch._dynamo.reset()
    return per_step


def test_the_compiled_sam_step_compiles_once_with_fewer_graphs_than_plain(
    monkeypatch,
):
    # Traced whole, the SAM step recompiled on steps 2-8 (`keras.ops.cond`
    # names each call from a counter its guards read) and then ran
    # uncompiled: 29 graphs on step 1, 6 more on step 2. The plain step
    # compiles 14 graphs, and 1 again on step 2.
    plain = graphs_compiled_per_step(monkeypatch, bn_dropout_model(), 3)
    sam = graphs_compiled_per_step(
        monkeypatch, keras_sam.SAMModel(bn_dropout_model(), rho=0.05), 3
    )
    assert sam[0] > 0
    assert sam[1:] == [0, 0]
    assert sum(sam) <= sum(plain)


def test_each_model_compiles_its_passes_into_one_program_of_its_own():
    # Dynamo keeps at most `recompile_limit` (8) programs of one code
    # object per process. The passes of all models had shared one, each
    # model taking two (the clean and the perturbed pass apart), so from the
    # fifth model on they ran uncompiled, with no word but dynamo's warning.
    import torch

    from keras_sam.backend import torch_compile

    torch._dynamo.reset()
    x, y, _, _ = softmax_data()
    codes = []
    with torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(3):
            inputs = keras.Input(x.shape[1:])
            hidden = keras.layers.Dropout(0.4)(keras.layers.Dense(16)(inputs))
            # Functional: dynamo had compiled a Sequential's passes as one.
            base = keras.Model(inputs, keras.layers.Dense(3)(hidden))
            model = keras_sam.SAMModel(base, rho=0.05)
            model.compile(optimizer=sgd(), loss=xent(), jit_compile=True)
            model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
            codes.append(torch_compile._compiled_by_model[model].code)
            programs = torch._dynamo.eval_frame._debug_get_cache_entry_list(
                codes[-1]
            )
            assert len(programs) == 1
    assert len({id(code) for code in codes}) == 3
    torch._dynamo.reset()


def test_a_step_in_another_thread_leaves_this_steps_compiled_pass():
    # The running model's compiled pass was a module global: a step that
    # ended in another thread reset it, so this thread's perturbed pass
    # ran uncompiled (or through the other model's program).
    import threading

    from keras_sam.backend import torch_compile

    class Model:
        pass

    this, other = Model(), Model()
    other_started, other_done = threading.Event(), threading.Event()
    passes = {}

    def this_step(_):
        passes["clean"] = torch_compile.compiled_pass(abs)
        other_started.set()
        other_done.wait(timeout=60)
        passes["perturbed"] = torch_compile.compiled_pass(abs)

    def other_step(_):
        other_started.wait(timeout=60)
        torch_compile.compiled_pass(abs)
        other_done.set()

    thread = threading.Thread(
        target=torch_compile._step_with_compiled_passes,
        args=(other, other_step, None),
    )
    thread.start()
    torch_compile._step_with_compiled_passes(this, this_step, None)
    thread.join()
    program = torch_compile._compiled_by_model[this].call
    assert passes["clean"].func is program
    assert passes["perturbed"].func is program
    assert torch_compile.compiled_pass(abs) is abs


def torch_module_model(trainable):
    import torch

    keras.utils.set_random_seed(2)
    torch.manual_seed(2)
    wrapped = keras.layers.TorchModuleWrapper(
        torch.nn.Linear(softmax_data()[0].shape[1], 4), name="torch_linear"
    )
    wrapped.trainable = trainable
    return keras.Sequential([wrapped, keras.layers.Dense(3)])


def test_a_trainable_torch_module_is_refused_naming_the_layer():
    # Its module reads its own parameters, not the values the passes hand
    # in: the SAM step left them unchanged (Keras warned only that no
    # gradient existed) where a plain fit trains them.
    x, y, _, _ = softmax_data()
    model = keras_sam.SAMModel(torch_module_model(trainable=True), rho=0.0)
    model.compile(optimizer=sgd(), loss=xent())
    with pytest.raises(ValueError, match=r"TorchModuleWrapper.*torch_linear"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"TorchModuleWrapper.*torch_linear"):
        keras_sam.sam_gradients(model.base, x[:BATCH], y[:BATCH], xent())


def test_a_frozen_torch_module_trains_as_a_plain_fit_at_rho_zero():
    x, y, _, _ = softmax_data()
    weights = []
    for wrap in (lambda m: m, lambda m: keras_sam.SAMModel(m, rho=0.0)):
        model = wrap(torch_module_model(trainable=False))
        model.compile(optimizer=sgd(), loss=xent())
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        weights.append([np.array(w) for w in model.get_weights()])
    for plain, sam in zip(*weights):
        np.testing.assert_array_equal(plain, sam)


@pytest.mark.parametrize(
    "micro_batches, jit_compile", [(1, False), (2, False), (1, True)]
)
def test_a_torch_modules_buffers_move_once_per_clean_pass(
    micro_batches, jit_compile
):
    # A module updates its buffers in place at each training call, which
    # the perturbed passes also made: BatchNorm1d's running statistics had
    # moved twice a step.
    import torch

    x, y, _, _ = softmax_data()
    norm = keras.layers.TorchModuleWrapper(
        torch.nn.BatchNorm1d(x.shape[1], affine=False), name="torch_norm"
    )
    norm.trainable = False
    base = keras.Sequential(
        [keras.Input(x.shape[1:]), norm, keras.layers.Dense(3)]
    )
    model = keras_sam.SAMModel(base, rho=0.5, micro_batches=micro_batches)
    model.compile(optimizer=sgd(), loss=xent(), jit_compile=jit_compile)
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    # Its input is the data, so the statistics follow from the batches'.
    mean, var = np.zeros(x.shape[1]), np.ones(x.shape[1])
    parts = [
        part
        for _ in range(2)
        for start in range(0, len(x), BATCH)
        for part in np.array_split(x[start : start + BATCH], micro_batches)
    ]
    for part in parts:
        mean = 0.9 * mean + 0.1 * part.mean(axis=0)
        var = 0.9 * var + 0.1 * part.var(axis=0, ddof=1)
    module = norm.module
    assert int(module.num_batches_tracked) == len(parts)
    np.testing.assert_allclose(module.running_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(module.running_var, var, rtol=1e-5, atol=1e-6)
