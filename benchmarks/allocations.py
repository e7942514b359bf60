"""The bytes of live tensors of a TensorFlow process over time, from the
events its CPU allocator records for the profiler.

The allocator's own peak (`tf.config.experimental.get_memory_info`) counts
the chunks it hands out, and TensorFlow's BFC allocator hands out a free
chunk of less than twice the request whole: a 4 MB activation may hold an
8 MB chunk, depending on which chunks the ops that ran before it freed. In
graph mode, where the executor's order of ready ops differs from process
to process, that moved the peak of identical processes by up to 24 MB. The
bytes the ops asked for, summed over the tensors alive at each moment, do
not depend on the chunks.

Needs `TF_CPU_ALLOCATOR_USE_BFC=true` (the default CPU allocator records
nothing), set before TensorFlow starts.
"""

import contextlib
import glob
import os
import re

import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

MEASURED_STEP = "keras_sam_measured_step"


@contextlib.contextmanager
def recorded(logdir):
    """Records every allocation made inside the block under `logdir`."""
    tf.profiler.experimental.start(
        logdir,
        options=tf.profiler.experimental.ProfilerOptions(host_tracer_level=3),
    )
    try:
        yield
    finally:
        tf.profiler.experimental.stop()


def measured(step):
    """`step`, marked in the record so that `tensor_peak` looks at it."""

    def run():
        with tf.profiler.experimental.Trace(MEASURED_STEP):
            step()

    return run


def read(logdir):
    """The record's allocation events in time order, as (picoseconds,
    address, bytes requested, op name) with negative bytes for a
    deallocation, and the (start, end) picoseconds of the measured steps."""
    (path,) = glob.glob(
        os.path.join(logdir, "**", "*.xplane.pb"), recursive=True
    )
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    events, steps = [], []
    for plane in space.planes:
        names = plane.event_metadata
        stat_names = plane.stat_metadata
        for line in plane.lines:
            for event in line.events:
                name = names[event.metadata_id].name
                start = line.timestamp_ns * 1000 + event.offset_ps
                if name == MEASURED_STEP:
                    steps.append((start, start + event.duration_ps))
                elif name in ("MemoryAllocation", "MemoryDeallocation"):
                    stats = {}
                    for stat in event.stats:
                        kind = stat.WhichOneof("value")
                        value = getattr(stat, kind) if kind else None
                        if kind == "ref_value":
                            value = stat_names[value].name
                        stats[stat_names[stat.metadata_id].name] = value
                    sign = 1 if name == "MemoryAllocation" else -1
                    events.append(
                        (
                            start,
                            stats["addr"],
                            sign * stats.get("requested_bytes", 0),
                            stats.get("tf_op") or "",
                        )
                    )
    events.sort(key=lambda event: event[0])
    return events, sorted(steps)


def tensor_peak(events, steps, in_model):
    """The most bytes of live tensors during the steps, and of those the
    bytes of tensors whose op `in_model(op name)` does not claim.

    A deallocation frees what its address's allocation requested; one whose
    allocation came before the record frees nothing it counted.
    """
    live, total, outside = {}, 0, 0
    peak = (0, 0)
    step = iter(steps)
    window = next(step, None)
    for time, address, size, op in events:
        if size > 0:
            claimed = in_model(op)
            live[address] = (size, claimed)
            total += size
            outside += 0 if claimed else size
        elif address in live:
            freed, claimed = live.pop(address)
            total -= freed
            outside -= 0 if claimed else freed
        while window is not None and time > window[1]:
            window = next(step, None)
        if window is not None and time >= window[0] and total > peak[0]:
            peak = (total, outside)
    return peak


def scope_matcher(name):
    """Whether an op runs in the name scope of a layer or model `name`
    (Keras appends `_<n>` to a scope entered again)."""
    pattern = re.compile(rf"(^|/){re.escape(name)}(_\d+)?/")
    return lambda op: bool(pattern.search(op))
