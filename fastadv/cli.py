"""The ``fastadv`` command: adversarial training and robust evaluation.

    fastadv train --data digits --method pgd --eps 0.2 --epochs 30 --out model.pt [--state train.state]
    fastadv eval  --data digits --checkpoint model.pt --attack pgd-50,apgd-ce --eps 0.2 \\
                  --report report.json --state state.pt [--plots DIR]
    fastadv demo  [--quick] [--quiet] [--device D] [--json PATH]
    fastadv bench --model smallcnn --attack PGD --batch 128 --steps 10 --mode exact [--json PATH] [--plot DIR]

``demo`` trains (or loads from $FASTADV_CACHE, default ~/.cache/fastadv) a plain and a
PGD-AT SmallCNN on digits, evaluates them and times fastadv against torchattacks
(fastadv.demo); ``bench`` runs the attack benchmark (benchmarks/bench_attacks.py, installed
as fastadv.bench) for one case; ``eval --plots`` adds PNG figures (fastadv.plots).

Both run under torchrun as well (``torchrun --nproc_per_node N -m fastadv ...``):
with WORLD_SIZE > 1 the process group is initialised from the environment (gloo on
the CPU, nccl on CUDA); training shards every batch over the ranks (DDP), evaluation
deals out batches to the ranks and reports the numbers of a single process. Only
rank 0 writes files and prints.

Errors in the input (unknown method or attack, a checkpoint that does not fit the
model, unusable data, labels outside the model's classes, a state file of another
evaluation or training run) print one clear line and exit with status 1; no existing
file is overwritten unless --overwrite is given (a matching --state file is resumed).
An interrupted ``train`` (Ctrl-C) prints one line and exits with status 130.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch

from fastadv import datasets
from fastadv.evaluate import ATTACKS, EvaluationError, attack_spec, parse_attack_list
from fastadv.runstate import StateFileError, atomic_write_text
from fastadv.train import METHODS

USER_ERRORS = (EvaluationError, StateFileError, datasets.DataError, datasets.ModelError)


class CLIError(ValueError):
    """A command-line usage problem found after parsing (files, combinations)."""


# -- process setup -------------------------------------------------------------------------

def _device(arg):
    if arg not in (None, "auto"):
        return torch.device(arg)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@contextlib.contextmanager
def distributed(device):
    """Initialise torch.distributed from torchrun's environment when WORLD_SIZE > 1."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _rank():
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _check_output(path, overwrite, what):
    """Refuse to replace an existing file without --overwrite; the folder must exist."""
    if path is None:
        return
    if os.path.isdir(path):
        raise CLIError(f"{what} {path} is a folder, expected a file path")
    if os.path.exists(path) and not overwrite:
        raise CLIError(f"{what} {path} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"the folder of {what} {path} does not exist")


def _distinct(**paths):
    seen = {}
    for flag, p in paths.items():
        if p is None:
            continue
        key = os.path.realpath(p)
        if key in seen:
            raise CLIError(f"--{seen[key]} and --{flag} name the same file {p}")
        seen[key] = flag


def _probe_classes(model, source, device):
    from fastadv.engine import model_guard

    x, _ = next(iter(source.batches([range(min(2, len(source)))])))
    with torch.no_grad(), model_guard(model):
        out = model(x.to(device))
    if out.dim() != 2:
        raise datasets.ModelError(f"the model must return logits [N, C], got shape {tuple(out.shape)}")
    return out.shape[1]


def _check_labels(y, n_classes, data):
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_classes:
        raise datasets.DataError(f"labels of {data} lie in [{lo}, {hi}] but the model has {n_classes} classes "
                                 f"(valid labels 0..{n_classes - 1})")


def _open_data(args, split):
    """The data of --data and its options: in memory or streamed (see fastadv.datasets.open_data)."""
    return datasets.open_data(args.data, split, args.limit, labels=args.labels, resize=args.resize, crop=args.crop,
                              skip_bad=args.skip_bad, workers=args.workers, log=lambda m: _print(m, args.quiet))


def _image_shape(source):
    x, _ = next(iter(source.batches([[0]])))
    return tuple(x.shape[1:])


def _model_for(args, source, meta=None, state_dict=None):
    """(model, spec, kwargs): --model, else the checkpoint's model, else SmallCNN sized from the data."""
    meta = meta or {}
    user_args = datasets.parse_model_args(args.model_args)
    if args.model:
        spec, kwargs = args.model, user_args
    elif meta.get("model"):
        spec, kwargs = meta["model"], {**meta.get("model_args", {}), **user_args}
    else:
        spec = datasets.DEFAULT_MODEL
        kwargs = datasets.default_model_args(_image_shape(source), source.labels)
        head = (state_dict or {}).get("head.weight")
        if isinstance(head, torch.Tensor) and head.dim() == 2:  # a plain SmallCNN state dict
            kwargs["n_classes"] = head.shape[0]
        kwargs.update(user_args)
    return datasets.build_model(spec, kwargs, args.model_dir), spec, kwargs


def _normalization(args, meta=None):
    """{'mean': [...], 'std': [...]} from --mean/--std, else the checkpoint's, else None."""
    if (args.mean is None) != (args.std is None):
        raise CLIError("--mean and --std go together")
    if args.mean is not None:
        return {"mean": args.mean, "std": args.std}
    return (meta or {}).get("normalize")


def _with_normalization(model, norm):
    return model if norm is None else datasets.Normalized(model, norm["mean"], norm["std"])


def _print(msg, quiet=False):
    if not quiet and _rank() == 0:
        print(msg, file=sys.stderr, flush=True)


# -- train ---------------------------------------------------------------------------------

def cmd_train(args):
    try:
        return _train(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback, the shell's status for SIGINT
        if int(os.environ.get("RANK", "0")) == 0:
            if args.state:
                print(f"fastadv train: interrupted; progress up to the last saved step is in {args.state}: "
                      "run the same command again to resume", file=sys.stderr, flush=True)
            else:
                print("fastadv train: interrupted; nothing was saved (pass --state PATH to make training resumable)",
                      file=sys.stderr, flush=True)
        return 130


def _train(args):
    from fastadv.train import TrainConfig, accuracy, fit

    _check_output(args.out, args.overwrite, "--out")
    _check_output(args.report, args.overwrite, "--report")
    if args.state is not None:  # an existing state is resumed (or refused), never overwritten by another run
        if os.path.isdir(args.state):
            raise CLIError(f"--state {args.state} is a folder, expected a file path")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.state))):
            raise CLIError(f"the folder of --state {args.state} does not exist")
    if args.save_every is not None:
        if args.state is None:
            raise CLIError("--save-every needs --state PATH to save to")
        if args.save_every < 1:
            raise CLIError(f"--save-every must be >= 1 (training steps), got {args.save_every}")
    _distinct(out=args.out, report=args.report, state=args.state)
    if args.method != "plain" and args.eps is None:
        raise CLIError(f"--eps is required for --method {args.method}")
    try:
        cfg = TrainConfig(method=args.method, eps=args.eps if args.eps is not None else 0.0, alpha=args.alpha,
                          steps=args.steps, beta=args.beta, replays=args.replays, random_start=not args.no_random_start,
                          bn_training=args.bn_train_attack, amp=None if args.amp == "none" else args.amp)
    except ValueError as e:
        raise CLIError(str(e)) from None
    device = _device(args.device)
    norm = _normalization(args)
    source = _open_data(args, args.split or "train")
    held_out = datasets.load_data("digits", "test") if args.data == "digits" and (args.split or "train") == "train" else None
    with distributed(device):
        torch.manual_seed(args.seed)  # the same initial model on every run: --state checks it before resuming
        model, spec, kwargs = _model_for(args, source)
        model.to(device)
        classifier = _with_normalization(model, norm)  # what fit trains and attacks: inputs in [0, 1]
        _check_labels(source.labels, _probe_classes(classifier, source, device), args.data)
        net = classifier
        if torch.distributed.is_initialized():
            net = torch.nn.parallel.DistributedDataParallel(classifier, device_ids=[device] if device.type == "cuda" else None)
        if args.compile:
            net = torch.compile(net)
        torch.manual_seed(args.seed + 1 + _rank())  # attack noise: independent across ranks
        t0 = time.perf_counter()
        history = fit(net, source, cfg, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
                      lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule, seed=args.seed,
                      progress=not args.quiet, state_path=args.state, save_every=args.save_every,
                      log=lambda m: _print(m, args.quiet))
        seconds = time.perf_counter() - t0  # model: the bare module inside any DDP / compile wrapper
        result = {
            "method": args.method, "config": cfg.to_dict(), "data": args.data, "n_train": len(source),
            "epochs": args.epochs, "batch_size": args.batch_size, "optimizer": args.optimizer, "lr": args.lr,
            "seed": args.seed, "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            "model": spec, "model_args": kwargs, "history": history, "seconds": seconds,
            "workers": args.workers, "normalize": norm,
            "train_accuracy": accuracy(classifier, source),
        }
        if held_out is not None:
            result["test_accuracy"] = accuracy(classifier, held_out[0], held_out[1])
        if _rank() == 0:
            _check_output(args.out, args.overwrite, "--out")
            datasets.write_checkpoint(args.out, model, model_spec=spec, model_args=kwargs, method=args.method,
                                      eps=args.eps, normalize=norm, train=json.loads(json.dumps(result, default=str)))
            if args.report:
                atomic_write_text(json.dumps(result, indent=2, default=str) + "\n", args.report)
            print(train_markdown(result, args.out))
    return 0


def train_markdown(r, out):
    lines = [f"### Training: {r['method']} on {r['data']}", "",
             f"{r['n_train']} samples, {r['epochs']} epochs, batch {r['batch_size']}, {r['optimizer']} lr {r['lr']}, "
             f"world size {r['world_size']}, {r['seconds']:.1f} s", "",
             "| epoch | loss | seconds | images/s |", "|---:|---:|---:|---:|"]
    lines += [f"| {h['epoch']} | {h['loss']:.4f} | {h['seconds']:.2f} | "
              f"{h['images'] / h['seconds'] if h.get('images') and h['seconds'] > 0 else float('nan'):.0f} |"
              for h in r["history"]]
    lines += ["", f"clean accuracy: train {100 * r['train_accuracy']:.2f}%"
              + (f", test {100 * r['test_accuracy']:.2f}%" if "test_accuracy" in r else ""), "", f"checkpoint: {out}"]
    return "\n".join(lines)


# -- eval ----------------------------------------------------------------------------------

def cmd_eval(args):
    from fastadv.evaluate import evaluate, to_json, to_markdown

    names = parse_attack_list(args.attack)
    specs = [attack_spec(n) for n in names]  # unknown or unavailable names fail here
    _check_output(args.report, args.overwrite, "--report")
    if args.state is not None:
        if os.path.isdir(args.state):
            raise CLIError(f"--state {args.state} is a folder, expected a file path")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.state))):
            raise CLIError(f"the folder of --state {args.state} does not exist")
    _distinct(report=args.report, state=args.state, checkpoint=args.checkpoint)
    plot_paths = _plot_paths(args.plots, args.overwrite)
    device = _device(args.device)
    weights_in_model_dir = (args.model or "").startswith("robustbench:")
    if args.checkpoint is None and not weights_in_model_dir:
        raise CLIError("--checkpoint is required (the weights to evaluate), except for --model robustbench:NAME")
    source = _open_data(args, args.split or "test")
    state_dict, meta = datasets.read_checkpoint(args.checkpoint) if args.checkpoint else ({}, {})
    norm = _normalization(args, meta)
    with distributed(device):
        model, spec, _ = _model_for(args, source, meta, state_dict)
        if args.checkpoint:
            datasets.load_weights(model, state_dict, args.checkpoint, spec)
        model = _with_normalization(model, norm).to(device).eval()
        _check_labels(source.labels, _probe_classes(model, source, device), args.data)
        report = evaluate(model, source, specs, eps=args.eps, batch_size=args.batch_size, state_path=args.state,
                          seed=args.seed, progress=not args.quiet, log=lambda m: _print(m, args.quiet),
                          exits=not args.no_exits)
        report.update({"data": args.data, "checkpoint": args.checkpoint, "model": spec, "normalize": norm,
                       "workers": args.workers,
                       "state": args.state, "device": str(device), "torch": torch.__version__})
        if _rank() == 0:
            if args.report:
                _check_output(args.report, args.overwrite, "--report")
                atomic_write_text(to_json(report) + "\n", args.report)
            print(to_markdown(report, title=f"Robust accuracy of {args.checkpoint} on {args.data}"))
        if plot_paths:
            _eval_plots(model, source, names, args, plot_paths, report)
    return 0


def _plot_paths(folder, overwrite):
    """The PNG paths of --plots DIR (the folder is created; existing files need --overwrite)."""
    if folder is None:
        return None
    from fastadv import plots

    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CLIError(f"--plots {folder} is a file, expected a folder")
    os.makedirs(folder, exist_ok=True)
    paths = {"curve": os.path.join(folder, plots.CURVE_PNG), "examples": os.path.join(folder, plots.EXAMPLES_PNG)}
    for p in paths.values():
        _check_output(p, overwrite, "--plots file")
    return paths


def _eval_plots(model, source, names, args, paths, report):
    """Robust accuracy versus eps (every attack alone) and a grid of adversarial examples."""
    from fastadv import plots

    _print(f"plots: robust accuracy of {', '.join(names)} at eps {plots.eps_grid(args.eps)}", args.quiet)
    curve = plots.robust_curve(model, source, None, names, args.eps, batch_size=args.batch_size, seed=args.seed)
    if _rank() == 0:
        x, y = next(iter(source.batches([range(min(6, len(source)))])))
        plots.plot_robust_curve(curve, paths["curve"], title=f"Robust accuracy versus eps ({args.data})")
        clean, adv, p_clean, p_adv, name = plots.adversarial_examples(model, x, y, names[0], args.eps, seed=args.seed)
        plots.plot_examples(clean, adv, y[:len(clean)], p_clean, p_adv, args.eps, paths["examples"], name=name)
        print(f"\nplots: {paths['curve']}, {paths['examples']}")
        if args.report:
            report["robust_curve"] = curve
            atomic_write_text(json.dumps({**json.loads(open(args.report).read()), "robust_curve": curve}, indent=2) + "\n",
                              args.report)


# -- demo ----------------------------------------------------------------------------------

def cmd_demo(args):
    from fastadv import demo

    _check_output(args.json, args.overwrite, "--json")
    device = _device(args.device)
    results = demo.run(quick=args.quick, device=device, quiet=args.quiet, cache=not args.no_cache, seed=args.seed,
                       log=lambda m: _print(m, args.quiet))
    if args.json:
        atomic_write_text(json.dumps(results, indent=2, default=str) + "\n", args.json)
    print(results["table"])
    return 0


# -- bench ---------------------------------------------------------------------------------

def _bench_modules():
    """fastadv.bench's attack benchmark, plot and results modules (the benchmarks/ suite, installed)."""
    from fastadv.bench import bench_attacks, plot, results

    return bench_attacks, plot, results


def cmd_bench(args):
    import tempfile

    bench, plot, results = _bench_modules()
    from fastadv.bench import models as bench_models

    if args.model not in bench_models.MODELS:
        raise CLIError(f"unknown --model {args.model!r}: expected one of {', '.join(sorted(bench_models.MODELS))}")
    if args.attack not in bench.ATTACKS:
        raise CLIError(f"unknown --attack {args.attack!r}: expected one of {', '.join(bench.ATTACKS)}")
    if args.batch < 1 or args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        raise CLIError("--batch, --steps and --repeats must be >= 1, --warmup >= 0")
    _check_output(args.json, args.overwrite, "--json")
    device = _device(args.device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        model = bench_models.build(args.model, device, seed=args.seed)
    except (ImportError, OSError) as e:
        raise CLIError(f"model {args.model}: {e}") from None
    x, y = bench.make_inputs(model, args.model, args.batch, device, args.seed)
    refs = {r.strip() for r in args.refs.split(",") if r.strip()}
    rows, note = bench.run_case(model, args.model, x, y, args.attack, args.mode, steps=args.steps,
                                repeats=args.repeats, warmup=args.warmup, device=device, backend=args.backend,
                                seed=args.seed, refs=refs)
    if note:
        raise CLIError(note)
    env = results.environment(device)
    for r in rows:
        r.update(env)
    print(f"{env['device']} | torch {env['torch']} | {env['date']}\n")
    results.print_table(rows, "attacks")
    text = json.dumps({"schema": 1, "rows": rows}, indent=1, default=str) + "\n"
    if args.json:
        atomic_write_text(text, args.json)
        print(f"\nwrote {args.json}")
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = args.json or os.path.join(tmp, f"bench-{args.model}-{args.attack}-b{args.batch}-{args.mode}.json")
            if not args.json:
                with open(src, "w") as f:
                    f.write(text)
            for png in plot.plot(src, args.plot):
                print(f"wrote {png}")
    return 0


# -- parser --------------------------------------------------------------------------------

def _common(p):
    p.add_argument("--data", default="digits",
                   help="'digits' (embedded), a folder of images in class sub-folders (streamed), a CIFAR-10/100 "
                        "python folder, images.npy (a memory map; with --labels), or a .npz/.pt file (default: digits)")
    p.add_argument("--labels", help="the labels (.npy) of --data IMAGES.npy")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="DataLoader worker processes decoding streamed data (default: 0, in the main process)")
    p.add_argument("--resize", type=int, metavar="S", help="folders: resize each image's shorter side to S pixels")
    p.add_argument("--crop", type=int, metavar="C", help="folders: the central C x C crop (after --resize)")
    p.add_argument("--skip-bad", action="store_true",
                   help="folders: skip unreadable images (reported) instead of stopping at the first")
    p.add_argument("--mean", type=float, nargs="+", help="per-channel mean the model's inputs are normalized with "
                   "(inside the model: attacks still see [0, 1] images); with --std")
    p.add_argument("--std", type=float, nargs="+", help="per-channel std for --mean")
    p.add_argument("--model-dir", help="robustbench:NAME's weights folder (DIR/<dataset>/<threat model>/NAME.pt)")
    p.add_argument("--split", choices=["train", "test"], help="digits or CIFAR split (default: train for train, test for eval)")
    p.add_argument("--limit", type=int, help="use only the first N samples")
    p.add_argument("--model", help="package.module:factory returning an nn.Module, torchvision:NAME, timm:NAME or "
                   "robustbench:NAME (when installed; nothing is downloaded) (default: fastadv.models:SmallCNN)")
    p.add_argument("--model-args", help="JSON keyword arguments for the model factory")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def build_parser():
    parser = argparse.ArgumentParser(prog="fastadv", description="Adversarial training and robust evaluation.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (adversarially)", description="Train a model, plainly or adversarially.")
    _common(t)
    t.add_argument("--method", required=True, choices=METHODS, help="training method")
    t.add_argument("--eps", type=float, help="Linf budget of the training attack (required except for plain)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--out", required=True, help="checkpoint to write (refused if it exists, unless --overwrite)")
    t.add_argument("--report", help="also write the training record as JSON here")
    t.add_argument("--alpha", type=float, help="attack step size (default: per method; see fastadv.train.TrainConfig)")
    t.add_argument("--steps", type=int, default=10, help="attack steps for pgd and trades (default: 10)")
    t.add_argument("--beta", type=float, default=6.0, help="TRADES beta (default: 6)")
    t.add_argument("--replays", type=int, default=4, help="Free AT replays m per batch (default: 4)")
    t.add_argument("--no-random-start", action="store_true", help="PGD-AT from the clean point")
    t.add_argument("--bn-train-attack", action="store_true", help="BatchNorm in train mode while crafting")
    t.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast precision (default: none)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    t.add_argument("--lr", type=float, default=1e-2)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    t.add_argument("--state", help="resumable training state: created, resumed if it matches, refused otherwise "
                   "(saved after every epoch, every --save-every steps, and on Ctrl-C)")
    t.add_argument("--save-every", type=int, metavar="N", help="with --state, also save every N training steps")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="robust accuracy under a cascade of attacks",
                       description="Robust accuracy under a cascade of attacks; resumable with --state.")
    _common(e)
    e.add_argument("--checkpoint", help="fastadv checkpoint or a state dict (.pt); required except for robustbench:NAME")
    e.add_argument("--attack", action="append", required=True,
                   help=f"attack name(s), repeatable or comma separated: {', '.join(ATTACKS)}; "
                        "iterative ones take -N steps, e.g. pgd-50")
    e.add_argument("--eps", type=float, required=True, help="budget in each attack's norm")
    e.add_argument("--report", help="results JSON (refused if it exists, unless --overwrite)")
    e.add_argument("--state", help="resumable state file: created, resumed if it matches, refused otherwise")
    e.add_argument("--plots", metavar="DIR", help="also write DIR/robust_vs_eps.png (each attack alone at "
                   "eps x [0, 1/4, 1/2, 3/4, 1]) and DIR/adversarial_examples.png")
    e.add_argument("--no-exits", action="store_true",
                   help="run every point's attack to its last step (the same flags; for comparing the exits' cost)")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="train plain and PGD-AT models on digits, evaluate, time against torchattacks",
                       description="The README's main job on the embedded digits: plain and PGD-AT SmallCNN (eps 0.2), "
                                   "clean / PGD-20 / AutoAttack accuracy, fastadv PGD-10 against torchattacks PGD-10. "
                                   "Checkpoints are cached in $FASTADV_CACHE (default ~/.cache/fastadv).")
    d.add_argument("--quick", action="store_true", help="3 epochs each, 64 test samples (under a minute on a CPU)")
    d.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto: CUDA when available)")
    d.add_argument("--json", help="also write the results as JSON here")
    d.add_argument("--no-cache", action="store_true", help="train afresh; neither read nor write cached checkpoints")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="time one attack: fastadv against torchattacks and the floor, with model calls",
                       description="Time one attack on one benchmark model: fastadv, the reference libraries and the "
                                   "floor, alternating runs, medians, and the model calls each makes per sample (fastadv.bench).")
    b.add_argument("--model", default="smallcnn", help="benchmark model: smallcnn, smallcnn-digits, linear, resnet18, "
                   "wrn-28-10, resnet50, robust-resnet18, digits-cnn (default: smallcnn)")
    b.add_argument("--attack", default="PGD", help="attack class, e.g. PGD, FGSM, APGD (default: PGD)")
    b.add_argument("--batch", type=int, default=128)
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--mode", choices=["exact", "fast"], default="exact")
    b.add_argument("--repeats", type=int, default=5, help="timed runs per library (default: 5)")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    b.add_argument("--refs", default="torchattacks,pyautoattack", help="reference libraries to run")
    b.add_argument("--backend", help="fastadv backend (default: auto)")
    b.add_argument("--device", default="auto")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", help="write the rows as JSON here")
    b.add_argument("--plot", metavar="DIR", help="write the bar chart PNG into DIR (benchmarks/plot.py)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, *USER_ERRORS) as e:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank fails alike; one says why
            print(f"fastadv {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
