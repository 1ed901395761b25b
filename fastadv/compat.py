"""``install_as_torchattacks()``: code written for torchattacks runs on fastadv unchanged.

After the call, ``import torchattacks`` and every module path of torchattacks 3.5.1 that
user code imports (``torchattacks.attack``, ``torchattacks.attacks.<name>``,
``torchattacks.wrappers.multiattack`` / ``lgv``) resolve to fastadv's classes, like
``pymysql.install_as_MySQLdb()``. The stand-in modules are thin: each attribute is looked
up in fastadv when first read, so nothing is imported before it is used.
"""
import sys
import types

import fastadv
from fastadv.attack import Attack

# torchattacks 3.5.1's layout: module -> the public classes it defines.
WRAPPERS = {"multiattack": "MultiAttack", "lgv": "LGV"}
_saved = {}


class _Alias(types.ModuleType):
    """A stand-in module whose attributes resolve to fastadv's on first use."""

    def __init__(self, name, names, doc):
        super().__init__(name, doc)
        self.__path__ = []  # a package: submodules resolve through sys.modules
        self._names = tuple(names)
        self.__all__ = list(self._names)

    def __getattr__(self, attr):
        if attr in self._names:
            value = getattr(fastadv, attr)
            setattr(self, attr, value)
            return value
        raise AttributeError(f"module {self.__name__!r} (fastadv's stand-in) has no attribute {attr!r}")

    def __dir__(self):
        return sorted({*super().__dir__(), *self._names})


def _modules(names):
    """Every torchattacks module path -> its stand-in."""
    attacks = [n for n in names if n not in WRAPPERS.values()]
    top = _Alias("torchattacks", [*names, "Attack"], "fastadv, installed as torchattacks")
    top.__version__ = fastadv.__version__
    top.__wrapper__ = list(fastadv.__wrapper__)
    top.__all__ = list(names)
    mods = {"torchattacks": top}
    mods["torchattacks.attack"] = _Alias("torchattacks.attack", ["Attack"], "fastadv.Attack")
    mods["torchattacks.attacks"] = _Alias("torchattacks.attacks", attacks, "fastadv's attacks")
    mods["torchattacks.wrappers"] = _Alias("torchattacks.wrappers", list(WRAPPERS.values()), "fastadv's wrappers")
    for name in attacks:
        mods[f"torchattacks.attacks.{name.lower()}"] = _Alias(f"torchattacks.attacks.{name.lower()}", [name], f"fastadv.{name}")
    for module, name in WRAPPERS.items():
        mods[f"torchattacks.wrappers.{module}"] = _Alias(f"torchattacks.wrappers.{module}", [name], f"fastadv.{name}")
    for path, mod in mods.items():  # parents hold their children, as after a real import
        parent, _, child = path.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
    mods["torchattacks.attack"].Attack = Attack
    return mods


def install_as_torchattacks():
    """Make ``import torchattacks`` (and its submodules) resolve to fastadv; returns the module.

    Call it once, before the imports of the code you run. Modules that imported the real
    torchattacks before the call keep it. ``uninstall_torchattacks()`` undoes it.
    """
    if "torchattacks" in _saved:
        return sys.modules["torchattacks"]
    names = [n for n in fastadv.__all__ if n[0].isupper() and n != "Attack"]
    mods = _modules(names)
    _saved["torchattacks"] = {k: v for k, v in sys.modules.items() if k == "torchattacks" or k.startswith("torchattacks.")}
    for k in _saved["torchattacks"]:
        del sys.modules[k]
    sys.modules.update(mods)
    return mods["torchattacks"]


def uninstall_torchattacks():
    """Undo install_as_torchattacks(): the modules named torchattacks are as they were before."""
    saved = _saved.pop("torchattacks", None)
    if saved is None:
        return
    for k in [k for k in sys.modules if k == "torchattacks" or k.startswith("torchattacks.")]:
        del sys.modules[k]
    sys.modules.update(saved)
