"""trainers.analyze as a program: it loads every kind of model saved.

Each model is saved here as the trainers save it (`base.save`); a fresh
process, which has imported none of the models' modules itself, loads it.
"""

import json
import os
import subprocess
import sys

import numpy as np

from tests import backends
from tests.trainers_run_test import ROOT
from trainers import models
from trainers.models import shake

# TensorFlow-only: the trainers' tf.data pipelines and tf.distribute;
# tests/trainers_backends_test.py runs a trainer on the other backends.
pytestmark = backends.tensorflow_only


def _python(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_analyze_measures_saved_shake_shake_and_pyramidnet_models(tmp_path):
    models = {
        "shake_shake": shake.shake_shake((32, 32, 3), 10, depth=8, width=4),
        "pyramidnet": shake.pyramidnet_shakedrop(
            (32, 32, 3), 10, depth=11, alpha=6
        ),
    }
    paths = []
    for name, model in models.items():
        (tmp_path / name).mkdir()
        paths.append(str(tmp_path / name / "model.keras"))
        model.save(paths[-1])
    _python(
        "-m",
        "trainers.analyze",
        f"--checkpoint={paths[0]}",
        f"--compare={paths[1]}",
        "--dataset=cifar10",
        "--synthetic_data",
        "--num_examples=8",
        "--batch_size=8",
        "--m=4",
        "--max_iterations=2",
        "--landscape_points=3",
        f"--output_dir={tmp_path / 'analysis'}",
    )
    with open(tmp_path / "analysis" / "analysis.json") as f:
        results = json.load(f)["models"]
    assert set(results) == set(models)
    for name, measures in results.items():
        assert np.isfinite(measures["top_eigenvalues"][0]), name
        assert np.isfinite(measures["m_sharpness"]), name


def test_analyze_loads_a_saved_imagenet_model(tmp_path):
    # Measuring a ResNet-50 takes minutes on a CPU; loading is what failed.
    path = str(tmp_path / "model.keras")
    models.build("resnet50", (32, 32, 3), 10).save(path)
    result = _python(
        "-c",
        "import sys; from trainers import analyze; "
        "print(analyze.load_model(sys.argv[1]).output_shape)",
        path,
    )
    assert result.stdout.strip().endswith("(None, 10)")
