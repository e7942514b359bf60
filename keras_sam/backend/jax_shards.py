"""The data shards' SAM steps as one computation (`keras.distribution`).

Written as slices of the global batch, the shards' steps are spread over the
whole mesh again by the compiler. As one `jax.vmap` over a leading shard
axis placed on the distribution's batch mesh axis, each shard's passes run
on the devices that hold its rows.
"""

import jax
import keras
from jax import numpy as jnp
from keras import tree


def map_shards(step, data, state, shards):
    """`step(data_i, state_i)` of each of `shards` shards, stacked.

    `data` (a nested batch whose first axis `shards` divides) is cut into
    consecutive shards, as Keras shards a batch over its batch mesh axis,
    and the shards' steps run as one computation vmapped over a leading
    shard axis on that mesh axis (`spmd_axis_name`). `state_i` is `state`
    with each Keras seed (`uint32[2]`) of shard `i > 0` folded with `i`,
    so the shards draw different random numbers, and the passes of one
    shard the same ones. Returns `step`'s outputs, each with a leading
    shard axis.
    """
    axis = keras.distribution.distribution().batch_dim_name

    def one_shard(shard, index):
        return step(shard, [_fold(s, index) for s in state])

    stacked = tree.map_structure(
        lambda t: (
            None if t is None else jnp.reshape(t, (shards, -1, *t.shape[1:]))
        ),
        data,
    )
    return jax.vmap(one_shard, spmd_axis_name=axis)(stacked, jnp.arange(shards))


def _fold(state, index):
    if state.dtype != jnp.uint32 or state.shape != (2,):
        return state
    return jnp.where(index == 0, state, jax.random.fold_in(state, index))
