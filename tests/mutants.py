"""Mutation check: does a test fail when keras_sam's code is changed?

Each mutant changes one expression (a sign, a norm, a weight, a guard)
of the library's math, its checks of arguments, the wrapper, `compat`,
the backend modules, the trainers' data, augmentation, models, loop,
processes, checkpoints, schedule and sharpness analysis, or the studies'
lock and the reports' choices on validation, in one copy of the
repository's files, made once, runs the tests that should catch it,
stopping at the first failure, and puts the expression back. A mutant
that every one of its tests passes is a place where no test can fail: a
defect of the tests (or an equivalent change, which the mutant's comment
must say).

    .venv/bin/python -m tests.mutants            # all: 79 min, 2 cores
    .venv/bin/python -m tests.mutants 3 17       # the ones with these ids

It prints one line per mutant and exits 1 unless every one is killed.
Not part of `make test` (each mutant runs its tests anew); run it after
changing the code it mutates or its tests. A pattern that no longer occurs
exactly once is reported as stale, to be updated with the code.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

P = "keras_sam/perturbations.py"
S = "keras_sam/sam_step.py"
B = "keras_sam/batch_parts.py"
W = "keras_sam/switching.py"
R = "keras_sam/schedules.py"
M = "keras_sam/sam_model.py"
C = "keras_sam/custom_loops.py"
L = "keras_sam/selection.py"
D = "keras_sam/backend/tensorflow_distribute.py"
A = "keras_sam/analysis.py"
OPTIONS = "keras_sam/options.py"
WRAPPER = "keras_sam/wrapper.py"
COMPAT = "keras_sam/compat.py"
TF_BACKEND = "keras_sam/backend/tensorflow.py"
JAX_BACKEND = "keras_sam/backend/jax.py"
JAX_SHARDS = "keras_sam/backend/jax_shards.py"
TORCH_BACKEND = "keras_sam/backend/torch.py"
ARRAYS = "trainers/data/arrays.py"
DATASETS = "trainers/data/datasets.py"
CHECKPOINT = "trainers/checkpoint.py"
LOOP = "trainers/loop.py"
STREAM = "trainers/data/stream.py"
AUTOAUGMENT = "trainers/data/autoaugment.py"
RESIDUAL = "trainers/models/residual.py"
AUGMENT = "trainers/data/augment.py"
STRATEGY = "trainers/strategy.py"
SHAKE = "trainers/models/shake.py"
ANALYZE = "trainers/analyze.py"
REPORT = "benchmarks/report_common.py"
REPORT_RESULTS = "benchmarks/report_results.py"
REPORT_CNN = "benchmarks/report_cnn.py"
STUDY = "benchmarks/generalization.py"
STUDY_LOCK = [
    "tests/benchmarks_report_test.py::test_a_run_is_claimed_by_one_study_"
    "process_at_a_time"
]


def tests(*names):
    return [f"tests/{name}_test.py" for name in names]


PERTURBATIONS = tests("perturbations")
VARIANTS = tests("variants")
SEMANTICS = tests("step_semantics")
FSAM = tests("friendly_sam")
STREAMED = tests("trainers_stream")
POLICIES = tests("trainers_autoaugment")
ANALYSIS = tests("analysis")
RUN_DATA = [
    "tests/trainers_run_test.py::test_analyze_measures_on_the_labels_the_"
    "run_trained_on",
    "tests/trainers_run_test.py::test_analyze_run_data_reads_moved_data_"
    "from_the_data_dir_given",
]

# (file, text, replacement, tests[, backend]); TensorFlow unless named.
MUTANTS = [
    (
        P,
        "rho / (norm + epsilon), 0.0)",
        "rho / (norm**0.5 + epsilon), 0.0)",
        PERTURBATIONS,
    ),
    (
        P,
        "return ops.sqrt(ops.sum(ops.stack(squares)))",
        "return ops.sum(ops.stack(squares))",
        PERTURBATIONS,
    ),
    (P, "return largest * _norm(", "return _norm(", tests("fuzz")),
    (
        P,
        "directions.append(ops.multiply(ops.multiply(g, t), t))",
        "directions.append(ops.multiply(g, t))",
        PERTURBATIONS,
    ),
    (
        P,
        't = ops.abs(ops.cast(w, "float32")) + eta',
        't = ops.abs(ops.cast(w, "float32"))',
        PERTURBATIONS,
    ),
    (
        P,
        "adaptive_mask = [True] * len(gradients)",
        "adaptive_mask = [False] * len(gradients)",
        PERTURBATIONS,
    ),
    (
        P,
        "norm_terms.append(g)\n",
        "norm_terms.append(None)\n",
        PERTURBATIONS + tests("sam_model"),
    ),
    (
        P,
        'd = ops.where(finite, ops.cast(d, "float32"), 0.0)',
        'd = ops.cast(d, "float32")',
        PERTURBATIONS,
    ),
    (
        P,
        "projection = dot / (squared + epsilon)",
        "projection = dot / (squared**0.5 + epsilon)",
        VARIANTS,
    ),
    (
        P,
        "return ops.subtract(p, ops.multiply(alpha, orthogonal))",
        "return ops.add(p, ops.multiply(alpha, orthogonal))",
        VARIANTS,
    ),
    (
        P,
        "ops.sum(ops.square(g)) + epsilon",
        "ops.sum(ops.square(s)) + epsilon",
        VARIANTS,
    ),
    (P, "scale = alpha * _global_norm([g]) / (", "scale = alpha / (", VARIANTS),
    (
        P,
        "lambda g, m: ops.subtract(g, ops.multiply(sigma, m))",
        "lambda g, m: ops.add(g, ops.multiply(sigma, m))",
        FSAM,
    ),
    (P, "decay * m + (1.0 - decay) * g", "(1.0 - decay) * m + decay * g", FSAM),
    (P, "new = ops.where(first, g, ", "new = ops.where(False, g, ", FSAM),
    (P, "return ops.where(finite, new, m)", "return new", FSAM),
    (
        P,
        "    gradients = backend.sum_duplicate_rows(gradients)\n    return _sc",
        "    return _sc",
        tests("sparse_gradients"),
    ),
    (
        S,
        "norm = perturbations.global_norm(gradients) / replicas",
        "norm = perturbations.global_norm(gradients)",
        tests("distribute"),
    ),
    # Where a layer draws from the backend's own generator (PyTorch's
    # unseeded dropout). Not mutated: restoring the generator after the
    # perturbed passes, which, drawing as the clean passes drew from the
    # same start, leave it where those left it.
    (
        S,
        "                backend.set_random_state(part.random_state)\n",
        "",
        tests("sam_model"),
        "torch",
    ),
    (
        S,
        "sharpness.append(perturbed.loss - part.clean.loss)",
        "sharpness.append(perturbed.loss)",
        SEMANTICS,
    ),
    (
        S,
        "part.clean.gradients, gradients, options.gsam_alpha",
        "gradients, part.clean.gradients, options.gsam_alpha",
        VARIANTS,
    ),
    (
        S,
        "old if d is None else ops.where(finite, d, old)",
        "old if d is None else d",
        tests("mixed_precision_variants"),
    ),
    (
        S,
        "                        part.clean.gradients, gradients\n",
        "                        gradients, part.clean.gradients\n",
        VARIANTS,
    ),
    (S, "None if g is None else g / ops.cast(unit, g.dtype)", "g", FSAM),
    (
        S,
        "grad_norm=perturbations.global_norm(perturbed.gradients)",
        'grad_norm=ops.zeros((), "float32")',
        tests("momentum_sam"),
    ),
    (
        S,
        "run_perturbed = take_sam if rho > 0 else False",
        "run_perturbed = take_sam",
        tests("sam_model"),
    ),
    (
        S,
        "if parts_count == 1 or needs_norm:",
        "if parts_count == 1:",
        tests("distribute"),
    ),
    (S, "    _assign(non_trainable, outcome.state)\n", "", tests("sam_model")),
    (
        S,
        "for_epsilon = perturbed_only(gradients)",
        "for_epsilon = gradients",
        VARIANTS,
    ),
    (
        S,
        "directions = perturbed_only(selection.values(momentums))",
        "directions = selection.values(momentums)",
        tests("momentum_sam"),
    ),
    (B, "start = i * size + min(i, extra)", "start = i * size", SEMANTICS),
    (
        B,
        "length = size + (1 if i < extra else 0)",
        "length = size + (1 if i <= extra else 0)",
        SEMANTICS,
    ),
    (B, "fraction = length / n\n", "fraction = 1 / parts\n", SEMANTICS),
    (
        B,
        "merged.append(old + weighted_mean(deltas, fractions))",
        "merged.append(old + deltas[0])",
        SEMANTICS,
    ),
    (
        B,
        "old if new is None or _is_floating(old) else new",
        "old if new is None else new",
        SEMANTICS,
    ),
    (
        B,
        'refused = {"sum", "mean_with_sample_weight"} if weighted else',
        'refused = {"sum"} if weighted else',
        SEMANTICS,
    ),
    (
        B,
        "length = size + ops.cast(i < extra, n.dtype)",
        "length = size + ops.cast(i <= extra, n.dtype)",
        SEMANTICS,
    ),
    (
        W,
        "return ops.equal(ops.mod(step, self.every), 0)",
        "return ops.equal(ops.mod(step, self.every), 1)",
        VARIANTS,
    ),
    (W, "ops.square(n - mean),", "ops.square(n - old_mean),", VARIANTS),
    (
        W,
        "return ops.square(norm / scale)",
        "return ops.square(norm)",
        tests("mixed_precision_variants"),
    ),
    (
        W,
        '"float32") / float(self.decay_steps), 1.0',
        '"float32") / float(self.decay_steps), 9.0',
        VARIANTS,
    ),
    (
        W,
        "late = ops.greater_equal(step, self.start_step)",
        "late = ops.greater(step, self.start_step)",
        tests("late_phase"),
    ),
    (
        M,
        "grad_norm = result.grad_norm * backend.replica_count() / scale",
        "grad_norm = result.grad_norm / scale",
        SEMANTICS,
    ),
    (
        M,
        "grad_norm = result.grad_norm * backend.replica_count() / scale",
        "grad_norm = result.grad_norm * backend.replica_count()",
        SEMANTICS,
    ),
    (
        M,
        "        loss = loss * ops.cast(replicas, loss.dtype)\n",
        "        loss = loss\n",
        tests("distribute"),
    ),
    (
        M,
        'ops.logical_and(finite, result.perturbed), "float32"',
        'finite, "float32"',
        SEMANTICS,
    ),
    (
        M,
        "x, y, result.y_pred, sample_weight=sample_weight\n",
        "x, y, result.y_pred, sample_weight=None\n",
        tests("keras_features"),
    ),
    (
        M,
        "            sample_weight=ops.shape(\n",
        "            sample_weight=0 * ops.shape(\n",
        tests("sam_model"),
    ),
    (
        L,
        '_OFFSET_NAMES = ("bias", "beta")',
        '_OFFSET_NAMES = ("bias",)',
        SEMANTICS,
    ),
    (
        L,
        "any(p.search(v.path) for p in patterns)",
        "any(p.fullmatch(v.path) for p in patterns)",
        VARIANTS,
    ),
    (
        D,
        '{"sum": tf.distribute.ReduceOp.SUM}.get(',
        '{"sum": tf.distribute.ReduceOp.MEAN}.get(',
        tests("distribute"),
    ),
    (
        C,
        "        loss = loss / replicas\n",
        "        loss = loss\n",
        tests("sam_gradients"),
    ),
    (
        C,
        "            if sample_weight is None and keeps_default:",
        "            if keeps_default:",
        tests("sam_gradients"),
    ),
    (
        C,
        "    if len(positional) >= 3 and positional[2].default is required:",
        "    if len(positional) >= 3:",
        tests("sam_gradients"),
    ),
    (
        R,
        "fraction = (lr - self.lr_min) / (self.lr_max - self.lr_min)",
        "fraction = (lr - self.lr_min) / self.lr_max",
        tests("schedules"),
    ),
    (
        R,
        "return ops.clip(rho, self.rho_min, self.rho_max)",
        "return rho",
        tests("schedules"),
    ),
    (
        R,
        'return ops.where(ops.greater_equal(rho, 0), rho, float("nan"))',
        "return rho",
        tests("arguments"),
    ),
    (
        A,
        "ops.convert_to_numpy(t).astype(np.float64) * n,",
        "ops.convert_to_numpy(t).astype(np.float64),",
        ANALYSIS,
    ),
    (
        A,
        "range(2):\n            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)\n"
        "        alphas",
        "range(0):\n            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)\n"
        "        alphas",
        ANALYSIS,
    ),
    (
        A,
        "return ritz, vectors[0] ** 2, exhausted",
        "return ritz, np.abs(vectors[0]), exhausted",
        ANALYSIS,
    ),
    (
        A,
        "density += kernel @ tau / (sigma * math.sqrt(2 * math.pi))",
        "density += kernel @ tau / sigma",
        ANALYSIS,
    ),
    (
        A,
        "return grid, density / num_probes, nodes",
        "return grid, density, nodes",
        ANALYSIS,
    ),
    (
        A,
        "axes = tuple(range(w.ndim - 1))",
        "axes = tuple(range(1, w.ndim))",
        ANALYSIS,
    ),
    (
        A,
        "                d = np.zeros_like(w)\n",
        "                pass\n",
        ANALYSIS,
    ),
    (
        A,
        "groups = dataset.unbatch().batch(m, drop_remainder=True)",
        "groups = dataset",
        ANALYSIS,
    ),
    (
        A,
        "values.append(float(perturbed_loss) - float(loss))",
        "values.append(float(perturbed_loss))",
        ANALYSIS,
    ),
    (
        A,
        "invariant = beta <= tol * max(abs(a) for a in alphas)",
        "invariant = beta <= tol",
        ANALYSIS,
    ),
    (
        A,
        "and np.all(np.abs(top - previous[0]) <= tol * np.max(np.abs(top)))",
        "and np.all(np.abs(top - previous[0]) <= tol)",
        ANALYSIS,
    ),
    (
        A,
        "if invariant and (not restart or j + 1 == steps):",
        "if invariant:",
        ANALYSIS,
    ),
    (
        A,
        "_combine(functions, w, [(a, d1), (b, d2)])",
        "_combine(functions, w, [(b, d1), (a, d2)])",
        ANALYSIS,
    ),
    (
        A,
        'model.weights if "float" in str(v.dtype)]',
        'model.trainable_weights if "float" in str(v.dtype)]',
        ANALYSIS,
    ),
    # Each check of an argument.
    (
        OPTIONS,
        "if options.sync_perturbations and micro_batches > 1:",
        "if False:",
        tests("sam_model"),
    ),
    (
        OPTIONS,
        "if not friendly_decay < 1:",
        "if not friendly_decay <= 1:",
        FSAM,
    ),
    (OPTIONS, "or value < minimum", "or value < 0", tests("sam_model")),
    (OPTIONS, "if not math.isfinite(value):", "if False:", tests("arguments")),
    (
        OPTIONS,
        "(value > minimum if strict else value >= minimum)",
        "(value >= minimum)",
        ANALYSIS,
    ),
    (OPTIONS, 'if options.perturbation != "friendly":', "if False:", FSAM),
    (OPTIONS, "if isinstance(rho, type):", "if False:", tests("arguments")),
    (OPTIONS, "if switching is None:", "if False:", tests("arguments")),
    (OPTIONS, "if micro_batches > 1:", "if False:", tests("arguments")),
    (
        OPTIONS,
        'if options.adaptive_variables not in ("weights", "all"):',
        "if False:",
        tests("arguments"),
    ),
    (OPTIONS, "re.compile(pattern)", "pattern", tests("arguments")),
    # The wrapper's refusals and warnings.
    (
        WRAPPER,
        "replaced = [m for m in steps if overrides(base, m)]",
        "replaced = []",
        tests("keras_features"),
    ),
    (
        WRAPPER,
        "return loss is other or _loss_config(loss) == _loss_config(other)",
        "return loss is other",
        tests("keras_features"),
    ),
    (
        WRAPPER,
        "if isinstance(base, BaseWrapper):",
        "if False:",
        tests("arguments"),
    ),
    # Private Keras code.
    (
        COMPAT,
        "    return inner._iterations",
        "    return inner.iterations",
        tests("compat"),
    ),
    (
        COMPAT,
        '    inner = getattr(optimizer, "inner_optimizer", optimizer)\n'
        "    return inner._iterations",
        "    inner = optimizer\n    return inner._iterations",
        tests("compat"),
    ),
    (
        COMPAT,
        "                        variable.assign(value)",
        "                        pass",
        tests("compat"),
        "jax",
    ),
    # What each backend module computes.
    (
        TF_BACKEND,
        "_summed_rows(t) if isinstance(t, tf.IndexedSlices) else t",
        "t",
        tests("sparse_gradients"),
    ),
    (TF_BACKEND, "tf.reduce_sum(g * v)", "tf.reduce_sum(g * g)", ANALYSIS),
    (
        JAX_BACKEND,
        "(list(vector),))[1]",
        "(list(weights),))[1]",
        ANALYSIS,
        "jax",
    ),
    (
        JAX_BACKEND,
        "return mesh.shape[mesh.axis_names.index(batch_axis)]",
        "return 1",
        tests("jax_distribution"),
        "jax",
    ),
    (
        JAX_BACKEND,
        "zip((variables, optimizer.variables), new_values)",
        "zip((variables,), new_values)",
        tests("sam_model"),
        "jax",
    ),
    (
        JAX_SHARDS,
        "jnp.where(index == 0, state, jax.random.fold_in(state, index))",
        "state",
        tests("jax_distribution"),
        "jax",
    ),
    (  # The shards interleaved instead of consecutive.
        JAX_SHARDS,
        "jnp.reshape(t, (shards, -1, *t.shape[1:]))",
        "jnp.swapaxes(jnp.reshape(t, (-1, shards, *t.shape[1:])), 0, 1)",
        tests("jax_distribution"),
        "jax",
    ),
    (
        TORCH_BACKEND,
        "torch.sum(g * v)",
        "torch.sum(g * g)",
        ANALYSIS,
        "torch",
    ),
    (
        TORCH_BACKEND,
        "if world_size > 1:",
        "if world_size > 2:",
        tests("torch_backend"),
        "torch",
    ),
    # The trainers' data, checkpoints and schedule.
    (  # The validation rows trained on too.
        ARRAYS,
        "train.images[:-held_out], train.labels[:-held_out]",
        "train.images, train.labels",
        tests("trainers_arrays"),
    ),
    (
        ARRAYS,
        "np.random.default_rng([seed, epoch])",
        "np.random.default_rng(seed)",
        tests("trainers_arrays"),
    ),
    (
        ARRAYS,
        "tf.stack([tf.constant(seed, tf.int64), step])",
        "tf.stack([tf.constant(seed, tf.int64), 0 * step])",
        tests("trainers_arrays"),
    ),
    (
        DATASETS,
        "rng.choice(len(labels), count, replace=False)",
        "rng.choice(len(labels), count, replace=True)",
        tests("trainers_data"),
    ),
    (  # The last class never drawn as a noisy label.
        DATASETS,
        "rng.integers(0, num_classes, count)",
        "rng.integers(0, num_classes - 1, count)",
        tests("trainers_data"),
    ),
    (
        CHECKPOINT,
        "if _checksum(arrays) != written:",
        "if False:",
        tests("trainers_checkpoint"),
    ),
    (
        CHECKPOINT,
        "digest.update(value.tobytes())",
        "pass",
        tests("trainers_checkpoint"),
    ),
    (
        CHECKPOINT,
        "if keep_previous and os.path.exists(path):",
        "if False:",
        tests("trainers_checkpoint"),
    ),
    (
        LOOP,
        "decay_steps=total_steps",
        "decay_steps=2 * total_steps",
        tests("trainers_config"),
    ),
    (
        LOOP,
        "                variable.assign(value)",
        "                pass",
        tests("trainers_run"),
    ),
    (STREAM, "area_range=(0.08, 1.0)", "area_range=(0.3, 1.0)", STREAMED),
    (
        STREAM,
        "aspect_ratio_range=(3 / 4, 4 / 3)",
        "aspect_ratio_range=(0.9, 1.1)",
        STREAMED,
    ),
    (STREAM, "flip_seed) < 0.5", "flip_seed) < 0.0", STREAMED),
    (
        STREAM,
        "first = (epoch * steps_per_epoch + start) * batch_size",
        "first = start * batch_size",
        STREAMED,
    ),
    (STREAM, "dataset.skip(start * batch_size)", "dataset", STREAMED),
    (STREAM, "seed=seed * 100003 + epoch,", "seed=seed * 100003,", STREAMED),
    (
        STREAM,
        "dataset = dataset.take(config.train_examples)",
        "dataset = dataset.skip(0)",
        STREAMED,
    ),
    (
        STREAM,
        "first_step = epoch * steps_per_epoch + start",
        "first_step = start",
        STREAMED,
    ),
    (
        AUTOAUGMENT,
        "draws[:, stage] < probabilities",
        "draws[:, stage] >= probabilities",
        POLICIES,
    ),
    (AUTOAUGMENT, "sign_seed) < 0.5,", "sign_seed) < 0.0,", POLICIES),
    (
        AUTOAUGMENT,
        "maxval=len(policy), dtype=tf.int32",
        "maxval=len(policy) - 1, dtype=tf.int32",
        POLICIES,
    ),
    (
        AUTOAUGMENT,
        "for stage in range(stages):",
        "for stage in reversed(range(stages)):",
        POLICIES,
    ),
    (
        AUTOAUGMENT,
        "probability, magnitude or 0)",
        "probability, 0)",
        POLICIES,
    ),
    (  # The same weights, without the downsampling.
        RESIDUAL,
        "strides = 2 if stage > 0 and block == 0 else 1",
        "strides = 1",
        tests("trainers_models"),
    ),
    (  # The same weights, without the ReLU after each sum.
        RESIDUAL,
        "            if not preactivation:\n                h = keras.layers"
        ".ReLU()(h)\n",
        "",
        tests("trainers_models"),
    ),
    (
        AUGMENT,
        "* (2 * pad + 1), tf.int32)",
        "* (2 * pad), tf.int32)",
        tests("trainers_augment"),
    ),
    (
        AUGMENT,
        'mode="REFLECT"',
        'mode="SYMMETRIC"',
        tests("trainers_augment"),
    ),
    (
        AUGMENT,
        "top = centres[:, 0, None, None] - size // 2",
        "top = centres[:, 0, None, None]",
        tests("trainers_augment"),
    ),
    (
        AUGMENT,
        "flip = _uniform([tf.shape(images)[0], 1, 1, 1], seed) < 0.5",
        "flip = _uniform([1, 1, 1, 1], seed) < 0.5",
        tests("trainers_augment"),
    ),
    (
        LOOP,
        "validation_freq=config.eval_every_epochs",
        "validation_freq=1",
        tests("trainers_run"),
    ),
    (
        LOOP,
        "        if start_step % steps_per_epoch:",
        "        if False:",
        tests("trainers_run"),
    ),
    (
        LOOP,
        "every = config.checkpoint_every_steps or steps_per_epoch",
        "every = steps_per_epoch",
        tests("trainers_run"),
    ),
    (
        LOOP,
        "keras.callbacks.TerminateOnNaN(),",
        "",
        tests("trainers_faults"),
    ),
    (
        LOOP,
        "steps = min((epoch + 1) * steps_per_epoch, total_steps) - step",
        "steps = steps_per_epoch",
        tests("trainers_run"),
    ),
    (  # Every JAX process feeds the first rows of each batch.
        LOOP,
        "first, end = size * start // shards, size * stop // shards",
        "first, end = 0, size * (stop - start) // shards",
        tests("trainers_multi_process_jax"),
        "jax",
    ),
    (
        STRATEGY,
        "return (starts[0], starts[-1] + 1)",
        "return (0, len(starts))",
        tests("trainers_multi_process_jax"),
        "jax",
    ),
    (  # Every JAX process writes the checkpoint, the model, the results.
        LOOP,
        "        return strategy.process_index == 0\n",
        "        return True\n",
        tests("trainers_multi_process_jax"),
        "jax",
    ),
    (  # Non-finite weights (with a finite loss) written.
        CHECKPOINT,
        "        if not all(np.all(np.isfinite(_value(v))) for v in self.model"
        ".weights):\n            return\n",
        "",
        tests("trainers_faults"),
    ),
    (
        CHECKPOINT,
        "        if loss is not None and not np.isfinite(float(loss)):",
        "        if False:",
        tests("trainers_checkpoint"),
    ),
    (
        CHECKPOINT,
        "trained = min(batch + 1, steps) if steps else batch + 1",
        "trained = batch + 1",
        tests("trainers_faults"),
    ),
    (  # Saved at an epoch's last batch, before the epoch's logs.
        CHECKPOINT,
        "            if steps and trained >= steps:\n                self._due"
        " = True\n            else:\n                self._save(logs, "
        "metrics=True)",
        "            self._save(logs, metrics=True)",
        tests("trainers_run"),
    ),
    (
        CHECKPOINT,
        "        ended = self.last_step is None or self.step >= self.last_step",
        "        ended = True",
        tests("trainers_run"),
    ),
    (  # PyTorch's dropout masks drawn after the data loaders' draws.
        CHECKPOINT,
        "        if self._state is not None:\n            backend.set_random_"
        "state(self._state)\n\n    def on_train_batch_end",
        "        pass\n\n    def on_train_batch_end",
        tests("trainers_backends"),
        "torch",
    ),
    (  # The same weights, each block dropping half.
        SHAKE,
        "drop_rate=0.5 * (index + 1) / total_blocks",
        "drop_rate=0.5",
        tests("trainers_models_shake"),
    ),
    (  # The same weights, without the downsampling.
        SHAKE,
        "strides=2 if index and index % blocks_per_stage == 0 else 1",
        "strides=1",
        tests("trainers_models_shake"),
    ),
    (  # The same weights, without the downsampling.
        SHAKE,
        "            strides = 2 if stage > 0 and block == 0 else 1",
        "            strides = 1",
        tests("trainers_models_shake"),
    ),
    (  # The loss at the grid's end, not at w.
        ANALYZE,
        'result["landscape_1d"][len(alphas) // 2]',
        'result["landscape_1d"][0]',
        RUN_DATA,
    ),
    (  # The same images, measured on other examples' labels.
        ANALYZE,
        "train.labels[:examples]",
        "train.labels[-examples:]",
        RUN_DATA,
    ),
    (  # The run's recorded folder before the one given.
        ANALYZE,
        'else flags_obj.data_dir or recorded["data_dir"]',
        'else recorded["data_dir"] or flags_obj.data_dir',
        RUN_DATA,
    ),
    (  # Every report's ρ and α chosen on the test set.
        REPORT,
        'return max(runs, key=lambda r: r["validation_accuracy"])',
        'return max(runs, key=lambda r: r["test_accuracy"])',
        tests("benchmarks_report", "benchmarks_report_cnn"),
    ),
    (  # The variants' ρ and α chosen on the test set, beside the rule.
        REPORT_RESULTS,
        "value = common.best_on_validation(first)",
        'value = max(first, key=lambda r: r["test_accuracy"])',
        tests("benchmarks_report"),
    ),
    (  # The CNN's LookSAM α chosen on the test set, beside the rule.
        REPORT_CNN,
        "return alphas, common.best_on_validation(alphas)",
        'return alphas, max(alphas, key=lambda r: r["test_accuracy"])',
        tests("benchmarks_report_cnn"),
    ),
    (  # A lock whose process is gone is never taken over.
        STUDY,
        "        if owner and _alive(owner):",
        "        if owner:",
        STUDY_LOCK,
    ),
    (  # The lock outlives the run that took it.
        STUDY,
        "        yield True\n    finally:\n        os.remove(lock)",
        "        yield True\n    finally:\n        pass",
        STUDY_LOCK,
    ),
]


def _copy(destination):
    """The repository's files, tracked or not ignored, into `destination`."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for path in listed:
        source = os.path.join(ROOT, path)
        if os.path.isfile(source):
            os.makedirs(
                os.path.dirname(os.path.join(destination, path)),
                exist_ok=True,
            )
            shutil.copy2(source, os.path.join(destination, path))


def run(scratch, mutant):
    """Applies one mutant to the copy in `scratch`, runs its tests and
    puts the file back; returns (outcome, detail)."""
    path, text, replacement, test_files, *rest = mutant
    backend = rest[0] if rest else "tensorflow"
    file = os.path.join(scratch, path)
    with open(file) as f:
        source = f.read()
    if source.count(text) != 1:
        return "stale", f"{text!r} occurs {source.count(text)} times"
    try:
        with open(file, "w") as f:
            f.write(source.replace(text, replacement))
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
            + ["-x", "-n", "2", "--dist", "loadfile", *test_files],
            cwd=scratch,
            # No bytecode: a mutant's must not outlive its file.
            env=dict(
                os.environ, KERAS_BACKEND=backend, PYTHONDONTWRITEBYTECODE="1"
            ),
            capture_output=True,
            text=True,
        )
    finally:
        with open(file, "w") as f:
            f.write(source)
    lines = result.stdout.strip().splitlines() or [""]
    failed = [line for line in lines if line.startswith("FAILED")]
    if failed:  # `-x` under xdist may exit 2, "interrupted"
        return "killed", failed[0]
    if result.returncode == 0:
        return "SURVIVED", lines[-1]
    return "error", lines[-1]  # a collection error, not a failing test


def main(argv):
    ids = [int(arg) for arg in argv] or range(len(MUTANTS))
    survivors = []
    with tempfile.TemporaryDirectory(prefix="keras_sam_mutants_") as scratch:
        _copy(scratch)
        for mutant_id in ids:
            start = time.time()
            outcome, detail = run(scratch, MUTANTS[mutant_id])
            path, text = MUTANTS[mutant_id][:2]
            print(
                f"{mutant_id:3d} {outcome:8s} {time.time() - start:4.0f}s "
                f"{path}: {text.strip()[:50]!r} | {detail[:100]}",
                flush=True,
            )
            if outcome != "killed":
                survivors.append(mutant_id)
    print(f"{len(ids) - len(survivors)} of {len(ids)} killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
