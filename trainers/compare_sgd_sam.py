"""SGD next to SAM on the real Fashion-MNIST, same model, budget and seed.

What `make train` runs:

    python -m trainers.compare_sgd_sam \
        --data_dir=/usr/share/datasets/fashion-mnist

Both runs use the small CNN, 2 epochs at batch 128, SGD with momentum 0.9 and
a cosine schedule from 0.02; SGD is ρ = 0 (the same code path) and SAM is
ρ = 0.05. Each run checkpoints in --output_dir/{sgd,sam}, so running the
command again resumes or, when finished, only reprints the table.
"""

import os
import types

from absl import flags

from trainers import fashion_mnist
from trainers import flags as trainer_flags

FLAGS = flags.FLAGS


def define_flags():
    fashion_mnist.define_flags()
    flags.adopt_module_key_flags(fashion_mnist)
    flags.DEFINE_float("sam_rho", 0.05, "ρ of the SAM run.")
    FLAGS.set_default("epochs", 2)
    FLAGS.set_default("output_dir", "runs/compare_sgd_sam")


def run(flags_obj, datasets_override=None, strategy_override=None):
    """Trains SGD then SAM; returns {name: results}."""
    results = {}
    for name, rho in (("SGD", 0.0), ("SAM", flags_obj.sam_rho)):
        values = dict(flags_obj.flag_values_dict())
        values.update(
            rho=rho, output_dir=os.path.join(flags_obj.output_dir, name.lower())
        )
        print(f"\n=== {name} (rho={rho}) ===")
        results[name] = fashion_mnist.run(
            types.SimpleNamespace(**values),
            datasets_override=datasets_override,
            strategy_override=strategy_override,
        )
    return results


def format_table(results):
    lines = [
        "| optimizer | rho | test accuracy | test loss | steps "
        "| wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['flags']['rho']} | {r['test_accuracy']:.4f} | "
            f"{r['test_loss']:.4f} | {r['train_steps']} | "
            f"{r['wall_time_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(_):
    results = run(FLAGS)
    print("\nFashion-MNIST, small CNN, same budget and seed:\n")
    print(format_table(results))


if __name__ == "__main__":
    define_flags()
    trainer_flags.run_main(main)
