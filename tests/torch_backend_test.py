"""What only the PyTorch backend needs: no autograd graph outlives a step,
and several `torch.distributed` processes are refused."""

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
