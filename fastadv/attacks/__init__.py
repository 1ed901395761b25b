"""One module per attack family, each holding the loop, the plain function and the class.

REGISTRY maps every public class name to (module, plain-function name); fastadv
and fastadv.functional resolve their exports from it on first use.
"""
import importlib

REGISTRY = {
    "FGSM": ("fgsm", "fgsm"),
    "PGD": ("pgd", "pgd"),
    "PGDL2": ("pgdl2", "pgdl2"),
    "MIFGSM": ("mifgsm", "mifgsm"),
    "TPGD": ("tpgd", "tpgd"),
    "EOTPGD": ("eotpgd", "eotpgd"),
    "FFGSM": ("ffgsm", "ffgsm"),
    "RFGSM": ("rfgsm", "rfgsm"),
    "CW": ("cw", "cw"),
    "DeepFool": ("deepfool", "deepfool"),
    "APGD": ("apgd", "apgd"),
    "APGDT": ("apgdt", "apgdt"),
    "FAB": ("fab", "fab"),
    "Square": ("square", "square"),
    "MultiAttack": ("multiattack", "multiattack"),
    "AutoAttack": ("autoattack", "autoattack"),
    "OnePixel": ("onepixel", "onepixel"),
    "Pixle": ("pixle", "pixle"),
    "LGV": ("lgv", "lgv"),
}
FUNCTIONS = {fn: (module, fn) for module, fn in REGISTRY.values()}


def resolve(name: str, table: dict):
    module, attr = table[name]
    return getattr(importlib.import_module(f"fastadv.attacks.{module}"), attr if table is FUNCTIONS else name)


def __getattr__(name):
    if name in REGISTRY:
        return resolve(name, REGISTRY)
    if name in FUNCTIONS:
        return resolve(name, FUNCTIONS)
    raise AttributeError(f"module 'fastadv.attacks' has no attribute {name!r}")


__all__ = [*REGISTRY, *FUNCTIONS]
