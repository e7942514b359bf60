"""`.keras` files saved on one backend load on another and keep training.

The backend is fixed per process, so each direction runs a second Python
process on the other backend: it loads the file, checks the predictions and
the variants' state, trains one more epoch and saves; this process then
compares that epoch with the same epoch trained here.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras_sam
from keras_sam import switching
from tests.backends import BACKEND
from tests.sam_model_test import BATCH
from tests.sam_model_test import bn_dropout_model
from tests.sam_model_test import sgd
from tests.sam_model_test import softmax_data
from tests.sam_model_test import xent

# Each backend's pass sends files to the two others: all six directions.
OTHERS = [b for b in ("tensorflow", "jax", "torch") if b != BACKEND]

CONTINUE_ON_OTHER_BACKEND = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    import keras_sam  # registers the classes
    from tests.sam_model_test import BATCH, softmax_data

    path, out = sys.argv[1], sys.argv[2]
    x, y, _, _ = softmax_data()
    model = keras.saving.load_model(path)
    state = {
        "predictions": model.predict(x, verbose=0).tolist(),
        "policy": [float(v.numpy()) for v in model.switching.weights],
        "directions": [d.numpy().tolist() for d in model._looksam_directions],
        "iterations": int(model.optimizer.iterations.numpy()),
    }
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    state["trained"] = [w.tolist() for w in model.base.get_weights()]
    with open(out, "w") as f:
        json.dump(state, f)
    """
)


def variants_model():
    base = bn_dropout_model()
    base.layers[2].rate = 0.0  # Seeds are not saved in `.keras` files.
    model = keras_sam.SAMModel(
        base,
        rho=0.3,
        switching=switching.GradientNormOutlier(),
        looksam_alpha=0.7,
    )
    model.compile(optimizer=sgd(), loss=xent())
    return model


@pytest.mark.parametrize("other_backend", OTHERS)
def test_a_keras_file_continues_training_on_another_backend(
    tmp_path, other_backend
):
    x, y, _, _ = softmax_data()
    model = variants_model()
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
    path = os.fspath(tmp_path / "sam.keras")
    model.save(path)
    out = os.fspath(tmp_path / "other.json")
    process = subprocess.run(
        [sys.executable, "-c", CONTINUE_ON_OTHER_BACKEND, path, out],
        env={**os.environ, "KERAS_BACKEND": other_backend},
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    with open(out) as f:
        other = json.load(f)

    np.testing.assert_allclose(
        other["predictions"], model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
    policy = [float(v.numpy()) for v in model.switching.weights]
    assert policy[-1] == 1.0  # AE-SAM's statistics have started.
    np.testing.assert_allclose(other["policy"], policy, rtol=1e-6)
    for got, want in zip(other["directions"], model._looksam_directions):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-7)
    assert np.any([np.any(d.numpy() != 0) for d in model._looksam_directions])
    assert other["iterations"] == int(model.optimizer.iterations.numpy())

    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    for got, want in zip(other["trained"], model.base.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
