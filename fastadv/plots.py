"""Figures for ``fastadv eval --plots DIR`` (matplotlib, Agg backend, PNG files).

- ``robust_curve``: robust accuracy of each attack on its own (not as a cascade) at a
  few budgets around eps, by default [0, eps/4, eps/2, 3eps/4, eps]; at 0 it is the
  clean accuracy. ``plot_robust_curve`` draws one line per attack.
- ``plot_examples``: a grid of clean image, adversarial image and the perturbation
  (amplified to the full colour range, 0 = grey) for a few samples.
"""
import pathlib

import torch

CURVE_PNG = "robust_vs_eps.png"
EXAMPLES_PNG = "adversarial_examples.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def eps_grid(eps, points=5):
    """[0, eps/(points-1), ..., eps]."""
    return [eps * i / (points - 1) for i in range(points)]


def robust_curve(model, x, y, attacks, eps, *, batch_size=128, seed=0, points=5):
    """{'eps': [...], 'curves': {attack name: [robust accuracy at each eps]}}; each attack alone."""
    from fastadv.evaluate import attack_spec, evaluate

    grid = eps_grid(eps, points)
    clean = None
    curves = {}
    for a in attacks:
        spec = attack_spec(a)
        accs = []
        for e in grid:
            if e == 0:
                if clean is None:
                    clean = evaluate(model, x, y, [], eps=0.0, batch_size=batch_size, seed=seed)["clean"]["accuracy"]
                accs.append(clean)
            else:
                accs.append(evaluate(model, x, y, [spec], eps=e, batch_size=batch_size, seed=seed)["robust_accuracy"])
        curves[spec.name] = accs
    return {"eps": grid, "curves": curves}


def plot_robust_curve(curve, path, title="Robust accuracy versus eps"):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, accs in curve["curves"].items():
        ax.plot(curve["eps"], [100 * a for a in accs], marker="o", label=name)
    ax.set_xlabel("eps")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def adversarial_examples(model, x, y, attack, eps, *, n=6, seed=0):
    """(clean [n, ...], adversarial [n, ...], clean predictions, adversarial predictions) on the CPU."""
    from fastadv.engine import model_device, model_guard
    from fastadv.evaluate import attack_spec

    spec = attack_spec(attack)
    device = model_device(model, x.device)
    xs, ys = x[:n].to(device), y[:n].to(device)
    with model_guard(model):
        with torch.no_grad():
            n_classes = model(xs[:1]).shape[1]
        torch.manual_seed(seed)
        adv = spec.build(model, eps, n_classes)(xs, ys).detach()
        with torch.no_grad():
            p_clean, p_adv = model(xs).argmax(1), model(adv).argmax(1)
    return xs.cpu(), adv.cpu(), p_clean.cpu(), p_adv.cpu(), spec.name


def _image(t):
    t = t.float()
    if t.shape[0] == 1:
        return t[0].numpy(), "gray"
    return t[:3].permute(1, 2, 0).numpy(), None


def plot_examples(clean, adv, y, p_clean, p_adv, eps, path, name="attack"):
    """Rows: samples; columns: clean, adversarial, perturbation scaled by 1/eps (grey = 0)."""
    plt = _pyplot()
    n = len(clean)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i in range(n):
        img, cmap = _image(clean[i])
        axes[i, 0].imshow(img, cmap=cmap, vmin=0, vmax=1)
        axes[i, 0].set_title(f"clean: y={int(y[i])} pred={int(p_clean[i])}", fontsize=8)
        img, cmap = _image(adv[i])
        axes[i, 1].imshow(img, cmap=cmap, vmin=0, vmax=1)
        axes[i, 1].set_title(f"{name}: pred={int(p_adv[i])}", fontsize=8)
        delta = (adv[i] - clean[i]).float()
        amp = (0.5 + 0.5 * delta / max(eps, 1e-12)).clamp(0, 1)
        img, _ = _image(amp)
        axes[i, 2].imshow(img, cmap="seismic" if amp.shape[0] == 1 else None, vmin=0, vmax=1)
        axes[i, 2].set_title(f"perturbation x{0.5 / max(eps, 1e-12):.3g}", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(f"{name}, eps {eps:g}", fontsize=10)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
