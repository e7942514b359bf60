"""keras.applications models for the streamed data sets: ImageNet, finetuning.

Built with `weights=None` and without their top; a local weight file (never
a download) is loaded into their features, as keras.applications would with
`weights="imagenet"`, and a new head is built for the data set's classes.
Images reach them as float32 in [0, 1], like every model of `trainers`;
`ImagenetPreprocessing` converts them to what each architecture expects.
"""

import math
import os
import zipfile

import keras

# keras.applications models: constructor, preprocessing mode of their
# ImageNet weights, dropout of their own classification top.
APPLICATIONS = {
    "resnet50": (keras.applications.ResNet50, "caffe", 0.0),
    "resnet101": (keras.applications.ResNet101, "caffe", 0.0),
    "resnet152": (keras.applications.ResNet152, "caffe", 0.0),
    **{
        f"efficientnetb{i}": (
            getattr(keras.applications, f"EfficientNetB{i}"),
            "efficientnet",
            rate,
        )
        for i, rate in enumerate((0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5))
    },
}
HEAD = "head"
# keras.applications' EfficientNets built with weights="imagenet" rescale
# after their Normalization layer (its weights hold the standard deviations
# as variances); models loading those weights must do the same.
_IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable("keras_sam_trainers")
class ImagenetPreprocessing(keras.layers.Layer):
    """[0, 1] RGB images to the input of a keras.applications model.

    `mode` is that of `keras.applications.imagenet_utils.preprocess_input`
    ("caffe" for ResNets: BGR, ImageNet means subtracted); "efficientnet"
    only scales to [0, 255], since EfficientNets normalize inside.
    """

    def __init__(self, mode, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, images):
        images = images * 255.0
        if self.mode == "efficientnet":
            return images
        return keras.applications.imagenet_utils.preprocess_input(
            images, mode=self.mode
        )

    def get_config(self):
        return dict(super().get_config(), mode=self.mode)


def load_pretrained(backbone, path):
    """Loads weights of the keras.applications model into `backbone`.

    `backbone` is built without its top. Keras weight files
    (`.weights.h5`, `.keras`) may hold the model with or without its top;
    legacy `.h5` files are loaded in layer order if they hold the model
    without its top (`*_notop.h5`, as keras.applications downloads them)
    and else by layer name, where every weighted layer must be found.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--pretrained_weights={path!r} does not exist."
        )
    if not path.endswith((".h5", ".hdf5", ".keras")):
        raise ValueError(
            "--pretrained_weights must be a .weights.h5, .keras or legacy "
            f".h5 file. Received: --pretrained_weights={path!r}"
        )
    try:
        _load_weights_file(backbone, path)
    except (OSError, zipfile.BadZipFile) as error:  # h5py's, or a zip's
        raise OSError(
            f"--pretrained_weights={path!r} cannot be read as a weights "
            f"file: {error}"
        ) from error


def _load_weights_file(backbone, path):
    if path.endswith((".weights.h5", ".keras")):
        backbone.load_weights(path)
        return
    try:
        backbone.load_weights(path)
        return
    except ValueError as e:
        if "mismatch" not in str(e):
            raise
    import h5py

    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        saved = {
            name.decode() if isinstance(name, bytes) else name
            for name in group.attrs["layer_names"]
        }
    missing = [
        layer.name
        for layer in backbone.layers
        if layer.weights and layer.name not in saved
    ]
    if missing:
        raise ValueError(
            f"--pretrained_weights={path!r} holds no weights for the "
            f"layers {missing[:5]} of {backbone.name}; is it another "
            "architecture?"
        )
    backbone.load_weights(path, by_name=True)


def _after_normalization_rescaled(backbone):
    def call(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        if isinstance(layer, keras.layers.Normalization):
            outputs = keras.layers.Rescaling(
                [1.0 / math.sqrt(s) for s in _IMAGENET_STDDEV_RGB]
            )(outputs)
        return outputs

    return keras.models.clone_model(
        backbone, clone_function=lambda layer: layer, call_function=call
    )


def build(name, input_shape, num_classes, pretrained_weights=None):
    """`name`'s features, with `pretrained_weights` if given, and a new head.

    The head is the layer `HEAD` for `num_classes`, with the
    architecture's dropout before it.
    """
    application, mode, dropout = APPLICATIONS[name]
    backbone = application(
        include_top=False, weights=None, input_shape=input_shape, pooling="avg"
    )
    if pretrained_weights:
        load_pretrained(backbone, pretrained_weights)
        if mode == "efficientnet":
            backbone = _after_normalization_rescaled(backbone)
    inputs = keras.Input(input_shape)
    features = backbone(ImagenetPreprocessing(mode)(inputs))
    if dropout:
        features = keras.layers.Dropout(dropout)(features)
    outputs = keras.layers.Dense(num_classes, name=HEAD)(features)
    return keras.Model(inputs, outputs, name=name)
