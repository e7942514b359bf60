"""Every model a trainer builds, by name, for inputs scaled to [0, 1].

The paper's CIFAR, SVHN and Fashion-MNIST models (`simple`, `residual`,
`shake`) and keras.applications' ImageNet models (`applications`), each
with the weight decay of `regularization`.
"""

import keras

from keras_sam import compat
from trainers.models import applications
from trainers.models import regularization
from trainers.models import residual
from trainers.models import shake
from trainers.models import simple

MODELS = {
    "mlp": simple.mlp,
    "small_cnn": simple.small_cnn,
    "resnet20": lambda s, c, wd=0.0: residual.cifar_resnet(s, c, 20, wd),
    "resnet32": lambda s, c, wd=0.0: residual.cifar_resnet(s, c, 32, wd),
    "wrn_16_4": lambda s, c, wd=0.0: residual.wide_resnet(s, c, 16, 4, wd),
    "wrn_28_10": lambda s, c, wd=0.0: residual.wide_resnet(s, c, 28, 10, wd),
    "shake_shake_26_2x32d": lambda s, c, wd=0.0: shake.shake_shake(
        s, c, 26, 32, wd
    ),
    "shake_shake_26_2x96d": lambda s, c, wd=0.0: shake.shake_shake(
        s, c, 26, 96, wd
    ),
    "pyramidnet_110_48": lambda s, c, wd=0.0: shake.pyramidnet_shakedrop(
        s, c, 110, 48, wd
    ),
    "pyramidnet_272_200": lambda s, c, wd=0.0: shake.pyramidnet_shakedrop(
        s, c, 272, 200, wd
    ),
}


# Every model a trainer can build: those above, and keras.applications'.
NAMES = sorted(MODELS) + sorted(applications.APPLICATIONS)


def build(
    name,
    input_shape,
    num_classes,
    weight_decay=0.0,
    pretrained_weights=None,
    freeze_batchnorm=False,
):
    """The model `name` of `NAMES`, for [0, 1] images of `input_shape`.

    `pretrained_weights` (a local file) is for keras.applications models
    (`trainers.models.applications`), whose kernels get the weight decay of this
    module through their variables. `freeze_batchnorm` makes every
    BatchNormalization layer non-trainable, which in Keras 3 also runs it
    on its moving statistics.
    """
    if name in applications.APPLICATIONS:
        model = applications.build(
            name, input_shape, num_classes, pretrained_weights
        )
        regularizer = regularization.weight_decay_regularizer(weight_decay)
        for variable in model.trainable_weights:
            if variable.name.endswith("kernel"):
                variable.regularizer = regularizer
    elif name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; expected one of {NAMES}.")
    elif pretrained_weights:
        raise ValueError(
            "--pretrained_weights needs a keras.applications model "
            f"({', '.join(sorted(applications.APPLICATIONS))}). Received: "
            f"--model={name}"
        )
    else:
        model = MODELS[name](input_shape, num_classes, weight_decay)
    if freeze_batchnorm:
        for layer in compat.flatten_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    return model
