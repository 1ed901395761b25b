"""fastadv: adversarial attacks for PyTorch on fused Triton kernels.

A drop-in for torchattacks 3.5.1: same classes, signatures and results.
"""
from fastadv import functional
from fastadv.attack import Attack
from fastadv.attacks import FGSM, PGD, PGDL2

__version__ = "0.1.0"
__all__ = ["Attack", "FGSM", "PGD", "PGDL2", "functional", "__version__"]
