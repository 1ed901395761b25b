"""The floor's variants against torchattacks on the CPU (one thread, CPU time, 25 samples,
order rotating): which difference of the old floor (benchmarks.bench_attacks.floor_call_before)
made it slower than the libraries it should bound.

    python -m benchmarks.floor_ab
"""
import os
import statistics
import time

import torch
import torch.nn.functional as F

from . import models as bench_models
from .bench_attacks import floor_call, floor_call_before, make_inputs


def main():
    import torchattacks

    torch.set_num_threads(1)
    model = bench_models.build("smallcnn", "cpu")
    x, y = make_inputs(model, "smallcnn", 64, "cpu", 0)
    ta = torchattacks.PGD(model, steps=10)

    def before_unfrozen():  # the old floor with the parameters as the caller left them
        for _ in range(10):
            xa = x.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(xa), y)
            torch.autograd.grad(loss, xa)

    variants = {"floor (now)": floor_call(model, x, y, grads=10, forwards=None, mode_kw={}, device="cpu"),
                "floor, frozen parameters": floor_call(model, x, y, grads=10, forwards=None, mode_kw={}, device="cpu",
                                                       frozen=True),
                "floor, before": floor_call_before(model, x, y, grads=10, forwards=None, mode_kw={}, device="cpu"),
                "floor, before, unfrozen": before_unfrozen,
                "torchattacks PGD-10": lambda: ta(x, y)}
    for f in variants.values():
        f()
        f()
    names, t = list(variants), {k: [] for k in variants}
    print("load", os.getloadavg()[0])
    for r in range(25):
        for k in names[r % len(names):] + names[:r % len(names)]:
            c = time.process_time()
            variants[k]()
            t[k].append((time.process_time() - c) * 1e3)
    for k, s in t.items():
        s = sorted(s)
        print(f"{k:26s} median {statistics.median(s):7.1f} ms  p20-p80 {s[5]:.1f}-{s[19]:.1f}")
    print("load", os.getloadavg()[0])


if __name__ == "__main__":
    main()
