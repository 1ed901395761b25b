"""One module per attack family: the loop, the plain function and the class."""
from fastadv.attacks.fgsm import FGSM, fgsm
from fastadv.attacks.pgd import PGD, pgd
from fastadv.attacks.pgdl2 import PGDL2, pgdl2

__all__ = ["FGSM", "PGD", "PGDL2", "fgsm", "pgd", "pgdl2"]
