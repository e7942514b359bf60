"""One worker of a two-process MultiWorkerMirroredStrategy job (for tests).

    python -m tests.multi_worker_job OUTPUT.npz

reads its cluster from TF_CONFIG, trains SAMModel on the oracle's softmax
regression with per-replica ε and with sync_perturbations, and writes both
final weights to OUTPUT.npz.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

# The strategy must exist before anything else touches TensorFlow's context.
STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()

import numpy as np  # noqa: E402

from tests.distribute_test import fit  # noqa: E402
from tests.sam_model_test import RHO  # noqa: E402


def train(sync_perturbations):
    # tf.distribute splits each global batch of 8 into per-replica batches
    # and shards those across the workers (AUTO policy: by data), so worker
    # i trains on the i-th contiguous half of every global batch.
    return fit(STRATEGY, rho=RHO, sync_perturbations=sync_perturbations)


def main(path):
    (w, b), loss = train(sync_perturbations=False)
    (sync_w, sync_b), sync_loss = train(sync_perturbations=True)
    np.savez(
        path,
        w=w,
        b=b,
        loss=loss,
        sync_w=sync_w,
        sync_b=sync_b,
        sync_loss=sync_loss,
        replicas=STRATEGY.num_replicas_in_sync,
    )


if __name__ == "__main__":
    main(sys.argv[1])
