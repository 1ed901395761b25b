"""Does compiling the attack step itself pay on this CPU? One input-gradient evaluation
(forward, mean cross-entropy, input gradient) eager, as every attack runs it, against the
same step compiled whole by torch.compile (Inductor; torch.func.grad, so that forward and
backward are one graph), on tiny models where host work dominates and on a larger batch.

    python -m benchmarks.compiled_step            # CPU time, one thread, alternating; prints a table

Reports the median CPU time per step of each (after the compile, which is reported apart),
and whether the compiled gradient equals the eager one bit for bit (an exact-mode option
would need that). An engine option is worth adding only if the compiled step is faster.
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

CASES = {"mlp-b1": ("MLP", 1), "cnn-b8": ("SmallCNN", 8), "cnn-b256": ("SmallCNN", 256)}


def make(name, seed=0):
    from fastadv import models

    cls, batch = CASES[name]
    torch.manual_seed(seed)
    model = getattr(models, cls)().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, torch.rand(batch, 1, 8, 8), torch.randint(0, 10, (batch,))


def steps(model, x, y):
    """(eager step, compiled step): adv -> d CE(model(adv), y) / d adv."""

    def eager(adv):
        adv = adv.detach().requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad(F.cross_entropy(model(adv), y), adv)[0]

    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    loss = grad(lambda adv: F.cross_entropy(functional_call(model, (params, buffers), (adv,)), y))
    return eager, torch.compile(loss)


def measure(name, repeats, per_sample):
    model, x, y = make(name)
    eager, compiled = steps(model, x, y)
    t0 = time.process_time()
    out = compiled(x)
    compile_s = time.process_time() - t0
    equal = torch.equal(out, eager(x))
    fns = {"eager": eager, "compiled": compiled}
    for fn in fns.values():
        for _ in range(20):
            fn(x)
    samples = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            c0 = time.process_time()
            for _ in range(per_sample):
                fns[k](x)
            samples[k].append((time.process_time() - c0) * 1e6 / per_sample)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"case": name, "eager_us": med["eager"], "compiled_us": med["compiled"],
            "speedup": med["eager"] / med["compiled"], "compile_s": compile_s, "bit_exact": equal,
            "max_abs_diff": float((out - eager(x)).abs().max())}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.compiled_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--per-sample", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, CPU time (process_time), load {os.getloadavg()[0]:.2f}")
    print("| case | eager us/step | compiled us/step | speedup | compile s (CPU) | bit-exact | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        r = measure(name, args.repeats, args.per_sample)
        print(f"| {r['case']} | {r['eager_us']:.1f} | {r['compiled_us']:.1f} | {r['speedup']:.2f} | "
              f"{r['compile_s']:.1f} | {'yes' if r['bit_exact'] else 'no'} | {r['max_abs_diff']:.3g} |")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
