"""keras_sam: Sharpness-Aware Minimization (SAM, ASAM) for Keras 3."""

from keras_sam import options
from keras_sam import schedules
from keras_sam import switching
from keras_sam.custom_loops import sam_gradients
from keras_sam.custom_loops import stateless_sam_gradients
from keras_sam.options import SAMOptions
from keras_sam.perturbations import asam_perturbation
from keras_sam.perturbations import friendly_average
from keras_sam.perturbations import friendly_direction
from keras_sam.perturbations import global_norm
from keras_sam.perturbations import gsam_gradients
from keras_sam.perturbations import looksam_direction
from keras_sam.perturbations import looksam_gradients
from keras_sam.perturbations import sam_perturbation
from keras_sam.sam_model import SAMModel
from keras_sam.sam_step import SAMResult
from keras_sam.sam_step import compute_sam_gradients

__version__ = "0.1.0"

__all__ = [
    "SAMModel",
    "SAMOptions",
    "SAMResult",
    "asam_perturbation",
    "compute_sam_gradients",
    "friendly_average",
    "friendly_direction",
    "global_norm",
    "gsam_gradients",
    "looksam_direction",
    "looksam_gradients",
    "options",
    "sam_gradients",
    "sam_perturbation",
    "schedules",
    "stateless_sam_gradients",
    "switching",
]
