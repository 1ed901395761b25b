"""DeepFool's bound: max |fastadv.DeepFool - torchattacks.DeepFool| on the CPU in fp32.

fastadv runs DeepFool on batches, torchattacks one image at a time; the model's kernels
round differently for the two shapes, so the outputs differ by a few float32 steps. This
measures the largest difference over both trained digits models of the tests (the CNN with
BatchNorm and the MLP), steps 3, 10 and 50, overshoot 0, 0.02 and 0.1, and three sets of 128
test images, and writes every run with its provenance to benchmarks/results/deepfool_bound_cpu.md.
The bound the docs state and the tests assert (tests/test_cw_deepfool_square.py) is this
maximum, rounded up.

    python -m benchmarks.deepfool_bound
"""
import argparse
import copy
import itertools

import torch

from . import results


def measure(models, x, y, steps=(3, 10, 50), overshoots=(0.0, 0.02, 0.1), starts=(0, 128, 256), n=128):
    import torchattacks

    import fastadv

    rows = []
    for (name, model), s, over, start in itertools.product(models.items(), steps, overshoots, starts):
        xs, ys = x[start:start + n], y[start:start + n]
        expected = torchattacks.DeepFool(copy.deepcopy(model), steps=s, overshoot=over)(xs, ys)
        actual = fastadv.DeepFool(model, steps=s, overshoot=over)(xs, ys)
        rows.append({"model": name, "steps": s, "overshoot": over, "images": f"{start}:{start + n}",
                     "max_abs_diff": (actual - expected).abs().max().item(),
                     "differ": int((actual != expected).sum()), "elements": actual.numel()})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.deepfool_bound", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(results.RESULTS_DIR / "deepfool_bound_cpu.md"))
    args = p.parse_args(argv)
    from fastadv.data import load_digits
    from fastadv.models import MLP, SmallCNN, train_plain

    torch.set_num_threads(1)
    (x, y), (xt, yt) = load_digits(seed=0)
    torch.manual_seed(0)  # the models of tests/conftest.py
    models = {"cnn": train_plain(SmallCNN(), x, y, epochs=8, seed=0).eval(),
              "mlp": train_plain(MLP(), x, y, epochs=15, seed=1).eval()}
    rows = measure(models, xt, yt)
    env = results.environment("cpu")
    worst = max(r["max_abs_diff"] for r in rows)
    lines = ["# DeepFool: fastadv (batched) against torchattacks 3.5.1 (image by image), CPU, fp32", "",
             "Command: `python -m benchmarks.deepfool_bound`. " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".", "",
             f"Largest difference over the {len(rows)} runs: {worst:.3g} ({worst / 2 ** -24:.0f} float32 steps of "
             "2^-24, the spacing in [0.5, 1)).", "",
             "| model | steps | overshoot | images | max abs diff | elements that differ |", "|---|---:|---:|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['steps']} | {r['overshoot']} | {r['images']} | {r['max_abs_diff']:.3g} | "
              f"{r['differ']} of {r['elements']} |" for r in rows]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"largest difference {worst:.3g} over {len(rows)} runs; {args.out}")


if __name__ == "__main__":
    main()
