"""``fastadv demo``: the README's main job on the embedded data, end to end.

Trains (or loads from the cache) a plain SmallCNN and a PGD-AT SmallCNN (eps 0.2) on
scikit-learn's digits, evaluates clean, PGD-20 and AutoAttack robust accuracy on the
test split (as a cascade: AutoAttack runs on the points PGD-20 did not break), and
times fastadv's PGD-10 against torchattacks' PGD-10 on the PGD-AT model, the same
inputs and seed, in alternating runs (medians), checking that the outputs are
bit-identical. Prints a Markdown table; ``--json`` writes the numbers.

Checkpoints are cached in $FASTADV_CACHE (default ~/.cache/fastadv), keyed by the
method, epochs and seed. ``--quick`` (CI): 3 epochs each and 64 test samples.
"""
import os
import statistics
import time

import torch

EPS = 0.2
FULL = {"epochs": {"plain": 10, "pgd": 20}, "n_test": None, "repeats": 7}
QUICK = {"epochs": {"plain": 3, "pgd": 3}, "n_test": 64, "repeats": 3}
ATTACKS = ("pgd-20", "autoattack")


def cache_dir():
    return os.environ.get("FASTADV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastadv")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_or_load(method, epochs, x, y, device, *, seed=0, cache=True, log=print, progress=False):
    """(model in eval mode on device, train seconds or None when cached, checkpoint path or None)."""
    from fastadv import datasets
    from fastadv.models import SmallCNN
    from fastadv.train import TrainConfig, fit

    path = os.path.join(cache_dir(), f"demo-digits-smallcnn-{method}-eps{EPS:g}-e{epochs}-seed{seed}.pt")
    model = SmallCNN()
    if cache and os.path.isfile(path):
        try:
            state, _ = datasets.read_checkpoint(path)
            model.load_state_dict(state)
            log(f"{method}: loaded {path}")
            return model.to(device).eval(), None, path
        except Exception as e:  # noqa: BLE001 - a broken cache entry is retrained
            log(f"{method}: cached {path} unusable ({type(e).__name__}); retraining")
            model = SmallCNN()
    torch.manual_seed(seed)
    model = SmallCNN().to(device)
    cfg = TrainConfig(method=method, eps=EPS if method != "plain" else 0.0)
    log(f"{method}: training {epochs} epochs on {len(y)} digits ({device})")
    t0 = time.perf_counter()
    fit(model, x, y, cfg, epochs=epochs, batch_size=128, lr=1e-2, seed=seed, progress=progress)
    _sync(device)
    seconds = time.perf_counter() - t0
    model.eval()
    if cache:
        try:
            os.makedirs(cache_dir(), exist_ok=True)
            datasets.write_checkpoint(path, model, model_spec=datasets.DEFAULT_MODEL, model_args={},
                                      method=method, eps=EPS, epochs=epochs, seed=seed)
        except OSError as e:
            log(f"{method}: could not cache the checkpoint in {cache_dir()}: {e}")
            path = None
    return model, seconds, path if cache else None


def time_pgd(model, x, y, *, eps=EPS, steps=10, repeats=7, seed=0):
    """fastadv.PGD against torchattacks.PGD on the same model, inputs and seed; alternating runs."""
    import fastadv

    try:
        import torchattacks
    except ImportError:
        return {"error": "torchattacks is not installed"}
    device = x.device
    kw = dict(eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
    calls = {"fastadv": fastadv.PGD(model, **kw), "torchattacks": torchattacks.PGD(model, **kw)}
    times = {k: [] for k in calls}
    outputs = {}
    for r in range(repeats + 1):  # run 0 is the warm-up
        for name, atk in calls.items():
            torch.manual_seed(seed)
            _sync(device)
            t0 = time.perf_counter()
            out = atk(x, y)
            _sync(device)
            if r == 0:
                outputs[name] = out.detach()
            else:
                times[name].append(1e3 * (time.perf_counter() - t0))
    a, b = outputs["fastadv"], outputs["torchattacks"]
    equal = bool(torch.equal(a, b))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "attack": f"PGD-{steps}", "params": kw, "batch": len(y), "repeats": repeats, "seed": seed,
        "fastadv_ms": med["fastadv"], "torchattacks_ms": med["torchattacks"],
        "speedup": med["torchattacks"] / med["fastadv"], "bit_identical": equal,
        "max_abs_diff": 0.0 if equal else float((a.float() - b.float()).abs().max()),
        "samples_ms": times,
    }


def run(*, quick=False, device=None, quiet=False, cache=True, seed=0, log=None):
    """The demo's results as a dict (see markdown() for the table)."""
    from fastadv.data import load_digits
    from fastadv.evaluate import evaluate

    log = log or (lambda m: None)
    cfg = QUICK if quick else FULL
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    (x, y), (xt, yt) = load_digits(seed=0)
    if cfg["n_test"]:
        xt, yt = xt[:cfg["n_test"]], yt[:cfg["n_test"]]
    results = {"quick": quick, "device": str(device), "torch": torch.__version__, "data": "digits",
               "model": "fastadv.models.SmallCNN()", "eps": EPS, "n_train": len(y), "n_test": len(yt),
               "attacks": list(ATTACKS), "models": {}}
    models = {}
    for method in ("plain", "pgd"):
        epochs = cfg["epochs"][method]
        model, train_s, path = train_or_load(method, epochs, x, y, device, seed=seed, cache=cache, log=log,
                                             progress=not quiet)
        models[method] = model
        log(f"{method}: evaluating clean, {', '.join(ATTACKS)} on {len(yt)} test digits")
        rep = evaluate(model, xt, yt, list(ATTACKS), eps=EPS, batch_size=512, seed=seed, progress=not quiet)
        results["models"][method] = {
            "method": method, "epochs": epochs, "train_seconds": train_s, "cached": train_s is None,
            "checkpoint": path, "clean": rep["clean"]["accuracy"],
            **{a["name"]: a["robust_accuracy"] for a in rep["attacks"]},
            "eval_seconds": rep["clean"]["seconds"] + sum(a["seconds"] for a in rep["attacks"]),
        }
    log(f"timing fastadv PGD-10 against torchattacks PGD-10 ({cfg['repeats']} alternating runs)")
    results["timing"] = time_pgd(models["pgd"], xt.to(device), yt.to(device), repeats=cfg["repeats"], seed=seed)
    results["seconds"] = time.perf_counter() - t_start
    results["table"] = markdown(results)
    return results


def _pct(v):
    return "-" if v is None else f"{100 * v:.2f}%"


def markdown(r):
    title = "### fastadv demo: SmallCNN on scikit-learn digits, Linf eps 0.2" + (" (--quick)" if r["quick"] else "")
    lines = [title, "",
             f"{r['n_train']} train / {r['n_test']} test images, device {r['device']}, torch {r['torch']}; "
             "robust accuracy as a cascade (AutoAttack on the points PGD-20 did not break)", "",
             "| model | epochs | train s | clean | PGD-20 | AutoAttack |", "|---|---:|---:|---:|---:|---:|"]
    for m in r["models"].values():
        train = "cached" if m["cached"] else f"{m['train_seconds']:.1f}"
        label = "plain" if m["method"] == "plain" else "PGD-AT"
        lines.append(f"| {label} | {m['epochs']} | {train} | {_pct(m['clean'])} | {_pct(m.get('pgd-20'))} | "
                     f"{_pct(m.get('autoattack'))} |")
    t = r["timing"]
    lines.append("")
    if "error" in t:
        lines.append(f"PGD-10 timing skipped: {t['error']}")
    else:
        lines += [f"| {t['attack']} on the PGD-AT model, batch {t['batch']} | median ms | speedup | bit-identical |",
                  "|---|---:|---:|---|",
                  f"| fastadv | {t['fastadv_ms']:.2f} | {t['speedup']:.2f}x | "
                  f"{'yes' if t['bit_identical'] else 'NO (max abs diff %.3g)' % t['max_abs_diff']} |",
                  f"| torchattacks 3.5.1 | {t['torchattacks_ms']:.2f} | 1.00x | |", "",
                  f"{t['repeats']} alternating runs each after a warm-up, same seed; "
                  "speedup = torchattacks time / fastadv time."]
    if "seconds" in r:
        lines += ["", f"total wall time {r['seconds']:.1f} s"]
    return "\n".join(lines)
