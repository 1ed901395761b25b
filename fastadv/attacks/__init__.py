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
    "BIM": ("bim", "bim"),
    "UPGD": ("upgd", "upgd"),
    "DIFGSM": ("difgsm", "difgsm"),
    "TIFGSM": ("difgsm", "tifgsm"),
    "NIFGSM": ("nifgsm", "nifgsm"),
    "SINIFGSM": ("nifgsm", "sinifgsm"),
    "VMIFGSM": ("vmifgsm", "vmifgsm"),
    "VNIFGSM": ("vmifgsm", "vnifgsm"),
    "PIFGSM": ("pifgsm", "pifgsm"),
    "PIFGSMPP": ("pifgsmpp", "pifgsmpp"),
    "Jitter": ("jitter", "jitter"),
    "PGDRS": ("pgdrs", "pgdrs"),
    "PGDRSL2": ("pgdrsl2", "pgdrsl2"),
    "GN": ("gn", "gn"),
    "VANILA": ("vanila", "vanila"),
    "SPSA": ("spsa", "spsa"),
    "EADL1": ("ead", "eadl1"),
    "EADEN": ("ead", "eaden"),
    "JSMA": ("jsma", "jsma"),
    "SparseFool": ("sparsefool", "sparsefool"),
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
