"""Weight decay as the SAM paper's code adds it to the loss.

`λ/2 · Σ w²` over the kernels, whose gradient is `λ · w`, so that SAM sees
it at `w + ε`; biases and BatchNorm parameters are not decayed. Keras'
`L2(l)` adds `l · Σ w²` (gradient `2l · w`), hence `L2(λ / 2)`.
"""

import keras


def weight_decay_regularizer(weight_decay):
    """The kernel regularizer of weight decay `λ`, or `None` for `λ = 0`."""
    return keras.regularizers.L2(weight_decay / 2) if weight_decay else None
