"""Adversarial training on real data (scikit-learn's digits), evaluated; and training speed
against a torchattacks-based PGD-AT loop measured side by side in the same run.

    .venv/bin/python benchmarks/digits_table.py            # writes benchmarks/results/digits_table.{json,md}

For each method (plain, pgd, trades, fgsm-rs, free) it trains a SmallCNN on the digits
train split (eps 0.2), then measures on the test split:
- clean accuracy;
- robust accuracy under fastadv's AutoAttack (version 'standard', seed 0) and under
  the original (pyautoattack 0.2.0, the same settings: APGD-CE, APGD-T, FAB-T, Square;
  100 iterations, 5000 queries), both through fastadv.evaluate on the same batches
  (--eval-batch, default: the whole test split at once) and each with its default
  chunk of 250 points (the seed is re-applied per chunk), with their times.

Timing: PGD-AT epochs with fastadv's Trainer, a loop using torchattacks.PGD as the
inner attack, and the floor (the same number of forward + input-gradient backward
passes plus the training step, with no update arithmetic), in interleaved rounds
on identical models and data; the medians are reported.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastadv.data import load_digits  # noqa: E402
from fastadv.evaluate import AttackSpec, evaluate  # noqa: E402
from fastadv.models import SmallCNN  # noqa: E402
from fastadv.train import TrainConfig, Trainer, accuracy, fit, global_batches  # noqa: E402


def git_commit():
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = bool(subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, text=True).strip())
        return commit, dirty
    except Exception:
        return "unknown", None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def reference_autoattack(eps):
    """The original AutoAttack (pyautoattack) as an attack of fastadv.evaluate's cascade."""
    import logging

    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.ERROR)

    def build(model, eps_, n_classes):
        aa = AutoAttack(model, eps=eps_, norm="Linf", version="standard", seed=0, device=model_device(model))
        aa.verbose = False
        return lambda x, y: aa.run_standard_evaluation(x, y)[0]  # chunks of 250, as fastadv.AutoAttack's default

    return AttackSpec("autoattack-original", "Linf", build, {"package": "pyautoattack 0.2.0", "version": "standard", "seed": 0})


def model_device(model):
    return next(model.parameters()).device


# -- timing ----------------------------------------------------------------------------------

def torchattacks_epoch(model, opt, x, y, *, eps, alpha, steps, batch_size, epoch, seed):
    import torchattacks

    atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    model.train()
    for idx in global_batches(len(y), batch_size, epoch, seed):
        adv = atk(x[idx], y[idx])
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(adv), y[idx]).backward()
        opt.step()


def fastadv_epoch(trainer, x, y, *, batch_size, epoch, seed):
    for idx in global_batches(len(y), batch_size, epoch, seed):
        trainer.step(x[idx], y[idx])


def floor_epoch(model, opt, x, y, *, steps, batch_size, epoch, seed):
    """steps x (forward + input-gradient backward) in eval mode + the training step; no update ops."""
    params = list(model.parameters())
    for idx in global_batches(len(y), batch_size, epoch, seed):
        xb, yb = x[idx], y[idx]
        model.eval()
        for p in params:
            p.requires_grad_(False)
        adv = xb.clone().requires_grad_(True)
        for _ in range(steps):
            torch.autograd.grad(F.cross_entropy(model(adv), yb), adv)
        for p in params:
            p.requires_grad_(True)
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(adv.detach()), yb).backward()
        opt.step()


def time_training(x, y, *, eps, steps, batch_size, rounds, lr, seed):
    alpha = 2.5 * eps / steps
    runners = {}
    for name in ("fastadv", "torchattacks", "floor"):
        torch.manual_seed(seed)
        model = SmallCNN()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        runners[name] = (model, opt)
    trainer = Trainer(runners["fastadv"][0], runners["fastadv"][1], TrainConfig(method="pgd", eps=eps, alpha=alpha, steps=steps))
    fns = {
        "fastadv": lambda e: fastadv_epoch(trainer, x, y, batch_size=batch_size, epoch=e, seed=seed),
        "torchattacks": lambda e: torchattacks_epoch(*runners["torchattacks"], x, y, eps=eps, alpha=alpha, steps=steps,
                                                      batch_size=batch_size, epoch=e, seed=seed),
        "floor": lambda e: floor_epoch(*runners["floor"], x, y, steps=steps, batch_size=batch_size, epoch=e, seed=seed),
    }
    times = {k: [] for k in fns}
    for name, fn in fns.items():  # warm-up
        fn(0)
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in order:
            t0 = time.perf_counter()
            fns[name](r + 1)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return {
        "method": "pgd", "steps": steps, "alpha": alpha, "eps": eps, "batch_size": batch_size, "rounds": rounds,
        "epoch_seconds": times, "median_epoch_seconds": med, "min_epoch_seconds": best,
        "fastadv_vs_torchattacks": med["torchattacks"] / med["fastadv"],
        "fastadv_vs_floor": med["fastadv"] / med["floor"],
        "fastadv_vs_torchattacks_min": best["torchattacks"] / best["fastadv"],
        "fastadv_vs_floor_min": best["fastadv"] / best["floor"],
    }


# -- main ------------------------------------------------------------------------------------

DEFAULT_EPOCHS = {"plain": 10, "pgd": 20, "trades": 20, "fgsm-rs": 20, "free": 10}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--methods", default="plain,pgd,trades,fgsm-rs,free")
    p.add_argument("--epochs", type=json.loads, default=DEFAULT_EPOCHS, help="JSON {method: epochs}")
    p.add_argument("--replays", type=int, default=4, help="Free AT m")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    p.add_argument("--eval-batch", type=int, default=512,
                   help="evaluation batch of both AutoAttacks (the same for both, so their results and times compare)")
    p.add_argument("--timing-rounds", type=int, default=9)
    p.add_argument("--no-reference-aa", action="store_true", help="skip the original AutoAttack (pyautoattack)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_table"))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    (x, y), (xt, yt) = load_digits(seed=0)
    load_start = os.getloadavg()
    torch.manual_seed(args.seed)
    epochs = {**DEFAULT_EPOCHS, **args.epochs}
    rows = []
    t_all = time.perf_counter()
    for method in args.methods.split(","):
        torch.manual_seed(args.seed)
        model = SmallCNN()
        cfg = TrainConfig(method=method, eps=args.eps, replays=args.replays)
        t0 = time.perf_counter()
        history = fit(model, x, y, cfg, epochs=epochs[method], batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        train_s = time.perf_counter() - t0
        row = {"method": method, "epochs": epochs[method], "train_seconds": train_s,
               "epoch_seconds_median": statistics.median(h["seconds"] for h in history),
               "final_loss": history[-1]["loss"], "config": cfg.to_dict(),
               "clean_accuracy": accuracy(model, xt, yt)}
        rep = evaluate(model, xt, yt, ["autoattack"], eps=args.eps, batch_size=args.eval_batch, seed=args.seed)
        row["fastadv_robust_accuracy"] = rep["robust_accuracy"]
        row["fastadv_autoattack_seconds"] = rep["attacks"][0]["seconds"]
        if not args.no_reference_aa:
            aa = evaluate(model, xt, yt, [reference_autoattack(args.eps)], eps=args.eps, batch_size=args.eval_batch,
                          seed=args.seed)
            row["autoattack_original_robust_accuracy"] = aa["robust_accuracy"]
            row["autoattack_original_seconds"] = aa["attacks"][0]["seconds"]
        rows.append(row)
        print(f"{method}: clean {row['clean_accuracy']:.4f} fastadv {row['fastadv_robust_accuracy']:.4f} "
              f"AA {row.get('autoattack_original_robust_accuracy', float('nan')):.4f} train {train_s:.1f}s", file=sys.stderr)

    timing = time_training(x, y, eps=args.eps, steps=10, batch_size=args.batch_size, rounds=args.timing_rounds,
                           lr=args.lr, seed=args.seed)
    commit, dirty = git_commit()
    import torchattacks

    result = {
        "benchmark": "digits_table",
        "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT) else sys.executable,
                             os.path.relpath(os.path.abspath(__file__), ROOT), *sys.argv[1:]]),
        "commit": commit, "uncommitted_changes": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "threads": torch.get_num_threads(),
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "torch": torch.__version__, "python": platform.python_version(), "torchattacks": torchattacks.__version__,
        "data": {"name": "scikit-learn digits", "train": len(y), "test": len(yt), "shape": list(x.shape[1:])},
        "model": "fastadv.models.SmallCNN()", "eps": args.eps, "batch_size": args.batch_size, "lr": args.lr,
        "optimizer": "adam, cosine schedule", "eval_batch": args.eval_batch,
        "rows": rows, "timing": timing, "total_seconds": time.perf_counter() - t_all,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


def markdown(r):
    lines = [
        "# Adversarial training on digits (eps %g)" % r["eps"], "",
        f"`{r['command']}`  ",
        f"commit {r['commit']}{' (with uncommitted changes)' if r['uncommitted_changes'] else ''}, {r['date']}, "
        f"{r['device']}, {r['threads']} thread(s), torch {r['torch']}, torchattacks {r['torchattacks']}  ",
        f"load average at start/end: {r['load_average_start'][0]:.1f} / {r['load_average_end'][0]:.1f} (shared machine)", "",
        f"Data: {r['data']['name']}, {r['data']['train']} train / {r['data']['test']} test images, 8x8. "
        f"Model: {r['model']}. {r['optimizer']}, lr {r['lr']}, batch {r['batch_size']}.", "",
        "Robust accuracy under AutoAttack (Linf, version 'standard', seed 0): **fastadv** and **original** "
        f"(pyautoattack 0.2.0), both through `fastadv.evaluate` in batches of {r['eval_batch']}; AA s: each one's time.", "",
        "| method | epochs | train s | s/epoch | clean | AutoAttack fastadv | AA s | AutoAttack original | AA s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        orig = row.get("autoattack_original_robust_accuracy")
        cells = [row["method"], str(row["epochs"]), f"{row['train_seconds']:.1f}", f"{row['epoch_seconds_median']:.2f}",
                 f"{100 * row['clean_accuracy']:.2f}%", f"{100 * row['fastadv_robust_accuracy']:.2f}%",
                 f"{row['fastadv_autoattack_seconds']:.1f}",
                 "-" if orig is None else f"{100 * orig:.2f}%",
                 "-" if orig is None else f"{row['autoattack_original_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    t = r["timing"]
    m, b = t["median_epoch_seconds"], t["min_epoch_seconds"]
    lines += [
        "", f"## PGD-AT training speed (PGD-{t['steps']}, batch {t['batch_size']}, {t['rounds']} interleaved epochs per loop)", "",
        "| loop | median s/epoch | min s/epoch | time vs fastadv (median) | (min) |", "|---|---:|---:|---:|---:|",
        f"| fastadv Trainer (method pgd) | {m['fastadv']:.3f} | {b['fastadv']:.3f} | 1.00 | 1.00 |",
        f"| torchattacks.PGD inner attack | {m['torchattacks']:.3f} | {b['torchattacks']:.3f} | "
        f"{m['torchattacks'] / m['fastadv']:.2f} | {b['torchattacks'] / b['fastadv']:.2f} |",
        f"| floor (same passes, no update ops) | {m['floor']:.3f} | {b['floor']:.3f} | "
        f"{m['floor'] / m['fastadv']:.2f} | {b['floor'] / b['fastadv']:.2f} |", "",
        "On this CPU the forward and backward passes of the model dominate, so every loop runs at about the floor; "
        "the machine was shared with other jobs (see the load average), so treat differences of a few percent as noise.", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
