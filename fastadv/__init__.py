"""fastadv: adversarial attacks for PyTorch on fused Triton kernels.

A drop-in for torchattacks 3.5.1: same classes, signatures and results
(``import fastadv as torchattacks``, or ``fastadv.install_as_torchattacks()`` before
code that imports torchattacks). Attack classes load on first use.
"""
from fastadv import functional
from fastadv.attack import Attack
from fastadv.attacks import REGISTRY, resolve

__version__ = "0.1.0"
"""fastadv's version."""
__wrapper__ = ["LGV", "MultiAttack"]
"""The attacks that wrap other attacks or models, as torchattacks lists them."""


def install_as_torchattacks():
    """Make ``import torchattacks`` and its submodules resolve to fastadv; see fastadv.compat."""
    from fastadv.compat import install_as_torchattacks as install

    return install()


def __getattr__(name):
    if name in ("fit", "evaluate"):  # fastadv.fit(model, data, cfg), fastadv.evaluate(model, data, attacks, eps=...)
        from fastadv.train import fit
        import fastadv.evaluate as evaluate  # a callable module: calling it calls evaluate.evaluate

        return {"fit": fit, "evaluate": evaluate}[name]
    if name in REGISTRY:
        return resolve(name, REGISTRY)
    raise AttributeError(f"module 'fastadv' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *REGISTRY, "fit", "evaluate"])


__all__ = ["Attack", "functional", "install_as_torchattacks", "__version__", "__wrapper__", "fit", "evaluate", *REGISTRY]
