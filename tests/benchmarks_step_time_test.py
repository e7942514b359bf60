"""benchmarks.step_time: each contender is timed against the SGD step
beside it."""

import json
import types

import keras
import pytest
import tensorflow as tf

from benchmarks import process
from benchmarks import step_time
from tests import backends

pytestmark = backends.tensorflow_only


class FakeClock:
    """`time.process_time` and `time.perf_counter` that advance only when
    a fake step runs, by what that step is set to cost."""

    def __init__(self):
        self.now = 0.0
        self.calls = []

    def __call__(self):
        return self.now

    def step(self, name, costs):
        costs = iter(costs)

        def run():
            self.calls.append(name)
            self.now += next(costs)

        return run


def test_a_contender_is_paired_with_the_sgd_step_beside_it(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(step_time.time, "process_time", clock)
    monkeypatch.setattr(step_time.time, "perf_counter", clock)
    # The machine runs twice as fast in the second half of each round: the
    # SGD step after "b" costs 1, the one before "a" 2, and a, b cost
    # 10 and 5 at the speed of their neighbour.
    compiled = {
        "sgd": clock.step("sgd", [2.0, 1.0] * 2),
        "a": clock.step("a", [20.0] * 2),
        "b": clock.step("b", [5.0] * 2),
    }
    result = step_time.interleaved_ratios(compiled, rounds=1, steps=1)
    # The untimed round (its order shifted by -1), then round 0.
    assert clock.calls == ["sgd", "b", "a", "sgd", "sgd", "a", "b", "sgd"]
    ratios = {
        name: stats["cpu"]["median_ratio_to_sgd"]
        for name, stats in result["contenders"].items()
    }
    # Against the round's first SGD step, "b" would read 2.5.
    assert ratios == {"sgd": 1.0, "a": 10.0, "b": 5.0}
    assert result["contenders"]["sgd"]["cpu"]["step_ms"] == [2000.0, 1000.0]


def test_the_order_rotates_and_odd_counts_end_with_sgd(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(step_time.time, "process_time", clock)
    monkeypatch.setattr(step_time.time, "perf_counter", clock)
    compiled = {
        name: clock.step(name, [1.0] * 20) for name in ("sgd", "a", "b", "c")
    }
    step_time.interleaved_ratios(compiled, rounds=2, steps=1)
    rounds = [clock.calls[i : i + 6] for i in (0, 6, 12)]
    assert rounds == [
        ["sgd", "c", "a", "sgd", "b", "sgd"],  # the untimed round: shift -1
        ["sgd", "a", "b", "sgd", "c", "sgd"],
        ["sgd", "b", "c", "sgd", "a", "sgd"],
    ]


class HoldsACopy(step_time.Wrapper):
    """A plain training step that also holds a copy of its weights from
    before the forward pass until the gradients are computed."""

    def train_step(self, data):
        x, y = data
        variables = self.trainable_variables
        copies = [2.0 * v for v in variables]
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        grads = tape.gradient(loss, variables)
        with tf.control_dependencies(grads):  # the copies outlive the pass
            total = tf.add_n([tf.reduce_sum(c) for c in copies])
        with tf.control_dependencies([total]):
            grads = [tf.identity(g) for g in grads]
        self.optimizer.apply_gradients(zip(grads, variables))
        return {"loss": loss + 0.0 * total}


def _batch_of_ones():
    return tf.data.Dataset.from_tensors(
        (tf.ones((64, 1000)), tf.zeros((64,), "int32"))
    ).repeat()


def _in_fresh_process(call):
    """The JSON that `call`, a printing function of this module, prints in
    a fresh process whose allocator keeps statistics."""
    return json.loads(
        process.last_line_of_python(
            f"from tests import benchmarks_step_time_test as t; t.{call}",
            TF_CPU_ALLOCATOR_USE_BFC="true",
        )
    )


def print_memory(holds_a_copy):
    """Prints the memory figures (MB) of training a 4 MB dense layer and
    its weights' MB, as JSON."""
    step_time._set_threads(1)
    dense = keras.Sequential([keras.Input((1000,)), keras.layers.Dense(1000)])

    def build():
        keras.utils.set_random_seed(0)
        return (HoldsACopy(dense) if holds_a_copy else dense), dense

    measured = step_time.memory_mb(build, _batch_of_ones(), False)
    print(json.dumps([measured, 4 * dense.count_params() / 2**20]))


def test_peak_memory_resolves_one_held_copy_of_the_weights():
    # Each in a fresh process, as the benchmark measures: the figures count
    # every live tensor of the process.
    (plain, weights), (holding, _) = (
        _in_fresh_process(f"print_memory({holds})") for holds in (False, True)
    )
    # The batch and the activations take 0.5 MB; the copy 4 MB, made
    # outside the model's layers.
    for figure in ("tensors", "outside_model", "allocator"):
        assert holding[figure] - plain[figure] == pytest.approx(
            weights, rel=0.01
        ), figure
    # What the layer's scope holds at the peak: its output (64 x 1000) and
    # its kernel's gradient (1000 x 1000), float32.
    in_layers = plain["tensors"] - plain["outside_model"]
    assert in_layers == pytest.approx((64 + 1000) * 1000 * 4 / 2**20, rel=0.01)


def print_mlp_memory(sam, jit_compile):
    """Prints the memory figures (MB) of training an 8 MB MLP with SGD or
    inside a `SAMModel` and its weights' MB, as JSON."""
    import keras_sam

    step_time._set_threads(1)
    mlp = keras.Sequential(
        [
            keras.Input((1000,)),
            keras.layers.Dense(1000, activation="relu"),
            keras.layers.Dense(1000),
        ]
    )

    def build():
        keras.utils.set_random_seed(0)
        return (keras_sam.SAMModel(mlp, rho=0.05) if sam else mlp), mlp

    measured = step_time.memory_mb(build, _batch_of_ones(), jit_compile)
    print(json.dumps([measured, 4 * mlp.count_params() / 2**20]))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_sam_step_holds_at_most_one_copy_of_the_weights_more(jit_compile):
    (sgd, weights), (sam, _) = (
        _in_fresh_process(f"print_mlp_memory({sam}, {jit_compile})")
        for sam in (False, True)
    )
    # w + ε through the second pass. In graph mode, ε's guard against a
    # non-finite norm once held a zeros tensor per variable: +1.47 copies
    # of the allocator's peak.
    for figure in ("tensors", "allocator"):
        assert sam[figure] - sgd[figure] <= 1.0 * weights, figure


def print_update_order():
    """Prints, for a graph-mode SAM step with SGD and momentum, when the
    optimizer's first tensor and the backward passes' last tensor were
    allocated (picoseconds), as JSON."""
    import tempfile

    import keras_sam
    from benchmarks import allocations

    step_time._set_threads(1)
    keras.utils.set_random_seed(0)
    mlp = keras.Sequential([keras.Input((1000,)), keras.layers.Dense(1000)])
    with tempfile.TemporaryDirectory() as logdir:
        with allocations.recorded(logdir):
            step = step_time._compiled_step(
                keras_sam.SAMModel(mlp, rho=0.05), _batch_of_ones(), False
            )
            allocations.measured(step)()
        events, steps = allocations.read(logdir)
    (start, end), times = steps[-1], {"optimizer": [], "backward": []}
    for time, _, size, op in events:
        if size > 0 and start <= time <= end:
            op = op.replace("StatefulPartitionedCall/", "")
            if op.startswith("sgd/"):
                times["optimizer"].append(time)
            elif "gradient_tape/" in op:
                times["backward"].append(time)
    print(json.dumps([min(times["optimizer"]), max(times["backward"])]))


def test_a_sam_step_updates_after_both_passes():
    # SGD's m · μ needs no gradient: run when the step starts, it was held
    # through both passes (ResNet-20: +3 parameter copies at the peak).
    first_update, last_gradient = _in_fresh_process("print_update_order()")
    assert first_update > last_gradient


@pytest.mark.parametrize(
    "flag_values, message",
    [
        (dict(modes=["graph", "torch_compile"]), "--modes=graph,torch_compile"),
        (dict(modes=["jit"]), "--modes=jit"),
    ],
)
def test_a_mode_of_another_backend_is_refused(flag_values, message):
    flags_obj = types.SimpleNamespace(
        **{"memory": True, "pipeline": True, **flag_values}
    )
    with pytest.raises(ValueError, match=message):
        step_time._check_backend(flags_obj)
