"""Where exact-mode PGD's time goes on CUDA: one input-gradient evaluation with the model's
parameters requiring grad (as torchattacks leaves them) or not (as fastadv and the floor set
them), and PGD-k through fastadv (eager and CUDA graph) and torchattacks, on one model.

    python -m benchmarks.diag_input_grad --model resnet18 --batch 256

CUDA-event medians after warm-up, alternating the variants; prints one table.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

import fastadv

from . import models as bench_models


def grad_eval(model, x, y, params_grad):
    def run():  # the flags are set in the timed call: the loop below resets them before every variant
        for p in model.parameters():
            p.requires_grad_(params_grad)
        xa = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xa), y)
        torch.autograd.grad(loss, xa)

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = bench_models.build(args.model, "cuda", seed=0).eval()
    spec = bench_models.MODELS[args.model]
    x = torch.rand(args.batch, *spec.input_shape, device="cuda")
    y = torch.randint(0, spec.num_classes, (args.batch,), device="cuda")
    import torchattacks

    k = args.steps

    variants = {
        "grad eval, params requires_grad=True": grad_eval(model, x, y, True),
        "grad eval, params requires_grad=False": grad_eval(model, x, y, False),
        f"fastadv PGD-{k} exact, eager": lambda: fastadv.PGD(model, steps=k, cuda_graph=False)(x, y),
        f"fastadv PGD-{k} exact, graph": lambda: fastadv.PGD(model, steps=k, cuda_graph=True)(x, y),
        f"fastadv PGD-{k} exact, backend=torch": lambda: fastadv.PGD(model, steps=k, backend="torch")(x, y),
        f"torchattacks PGD-{k}": lambda: torchattacks.PGD(model, steps=k)(x, y),
    }
    times = {k: [] for k in variants}
    for _ in range(3):
        for fn in variants.values():
            fn()
    for p_ in model.parameters():
        p_.requires_grad_(True)
    for _ in range(args.repeats):
        for name, fn in variants.items():
            for p_ in model.parameters():  # every variant starts from the user's state
                p_.requires_grad_(True)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {args.model} b{args.batch} | "
          f"cudnn.benchmark={torch.backends.cudnn.benchmark} | medians of {args.repeats}")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.2f} ms |")


if __name__ == "__main__":
    main()
