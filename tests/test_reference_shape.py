"""The reference's own test, in its shape: every name of torchattacks.__all__, run through
``install_as_torchattacks()``.

torchattacks' own test loop (code_coverage/test_atks.py) builds each attack with its
defaults, attacks, then, where the attack supports it, calls ``set_mode_targeted_random()``
on the same attack and attacks again. Here each name is run so on a model trained in the
tests (both digits models), with small budgets where the defaults are slow, once with the
real torchattacks 3.5.1 and once with fastadv installed as torchattacks (the same script,
``import torchattacks``, the same seeds for torch, numpy and random), and the outputs are
compared:

- ``torch.equal`` for every name but two:
  - DeepFool is batched in fastadv, so not bit-exact: within the bound its docstring
    states (tests/test_cw_deepfool_square.py), success differing only at ties;
  - AutoAttack is the original's in fastadv (DESIGN: pyautoattack 0.2.0 is its
    reference, not torchattacks' 10-step cascade): compared with pyautoattack's
    AutoAttack, ``torch.equal`` as in tests/test_autoattack.py.
- Names that cannot be targeted (torchattacks raises ValueError) raise in fastadv too.
- The table must hold every name of the real torchattacks.__all__, so a new one cannot be
  skipped silently; after each run the real torchattacks is back in sys.modules.

TIFGSM, PIFGSM and PIFGSMPP run on 3-channel 16x16 digits through a pooling wrapper
(the reference's smoothing kernels assume 3 channels).
"""
import contextlib
import copy
import importlib
import io
import random
import sys

import numpy as np
import pytest
import torch
import torchattacks as real_torchattacks
from torch.utils.data import DataLoader, TensorDataset

import fastadv
from fastadv.compat import uninstall_torchattacks
from helpers import assert_equal
from test_autoattack import run_original
from test_cw_deepfool_square import DEEPFOOL_ATOL, TIE_GAP, label_gap, misclassified
from test_zoo_sign_a import Pooled, rgb16

# The defaults, with small budgets where the defaults would take long.
SMALL = {
    "VANILA": {}, "GN": {}, "FGSM": {}, "BIM": dict(steps=3), "RFGSM": dict(steps=3), "PGD": dict(steps=3),
    "EOTPGD": dict(steps=3), "FFGSM": {}, "TPGD": dict(steps=3), "MIFGSM": dict(steps=3), "UPGD": dict(steps=3),
    "APGD": dict(steps=3), "APGDT": dict(steps=3), "DIFGSM": dict(steps=3), "TIFGSM": dict(steps=3),
    "Jitter": dict(steps=3), "NIFGSM": dict(steps=3), "PGDRS": dict(steps=2), "SINIFGSM": dict(steps=2, m=2),
    "VMIFGSM": dict(steps=2, N=2), "VNIFGSM": dict(steps=2, N=2), "SPSA": dict(nb_sample=16, max_batch_size=8),
    "JSMA": {}, "EADL1": dict(binary_search_steps=4, max_iterations=10),
    "EADEN": dict(binary_search_steps=4, max_iterations=10), "PIFGSM": dict(num_iter_set=3),
    "PIFGSMPP": dict(num_iter_set=3), "CW": {}, "PGDL2": dict(steps=3), "DeepFool": dict(steps=3),
    "PGDRSL2": dict(steps=2), "SparseFool": dict(steps=1), "OnePixel": dict(steps=2, popsize=5),
    "Pixle": dict(restarts=2, max_iterations=3), "FAB": dict(steps=3), "Square": dict(n_queries=1000),
    "AutoAttack": dict(steps=2, n_queries=20),  # fastadv's keywords; pyautoattack gets the same counts
    "MultiAttack": {}, "LGV": dict(epochs=1, nb_models_epoch=2, steps=2, verbose=False),  # BIM, the default
}
RGB = {"TIFGSM", "PIFGSM", "PIFGSMPP"}


def build(lib, name, model, loader):
    """The attack as a torchattacks script builds it; lib is torchattacks, real or installed."""
    if name == "MultiAttack":
        return lib.MultiAttack([lib.FGSM(model), lib.PGD(model, steps=2)])
    if name == "AutoAttack" and lib is real_torchattacks:
        return lib.AutoAttack(model)  # only asked which modes it supports; pyautoattack gives the bits
    args = (loader,) if name == "LGV" else ()
    return getattr(lib, name)(model, *args, **SMALL[name])


def seeded(atk, x, y):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    with contextlib.redirect_stdout(io.StringIO()):  # LGV and MultiAttack may print
        return atk(x, y)


def untargeted_then_random(lib, name, model, x, y, loader):
    """[untargeted output, output after set_mode_targeted_random() or None where it raises]."""
    atk = build(lib, name, copy.deepcopy(model), loader)
    outputs = [None if lib is real_torchattacks and name == "AutoAttack" else seeded(atk, x, y)]
    try:
        atk.set_mode_targeted_random(quiet=True)
    except ValueError as err:
        assert "targeted" in str(err).lower(), err
        return outputs + [None]
    return outputs + [seeded(atk, x, y)]


def assert_matches(name, model, actual, expected, x, y, what):
    if name != "DeepFool":
        assert_equal(actual, expected, what)
        return
    diff = (actual - expected).abs().max().item()
    assert diff <= DEEPFOOL_ATOL, f"{what}: max abs diff {diff:.3g} > {DEEPFOOL_ATOL}"
    differ = misclassified(model, actual, y) != misclassified(model, expected, y)
    ties = (label_gap(model, actual, y).abs() <= TIE_GAP) & (label_gap(model, expected, y).abs() <= TIE_GAP)
    assert (ties | ~differ).all(), f"{what}: success differs away from a tie on {int((differ & ~ties).sum())} images"


@pytest.fixture
def loader(digits):
    (x, y), _ = digits
    return DataLoader(TensorDataset(x[:256], y[:256]), batch_size=64, shuffle=True)


@pytest.mark.parametrize("name", real_torchattacks.__all__)
def test_every_reference_name_through_install(name, model, batch, loader, monkeypatch):
    assert name in fastadv.__all__ and name in SMALL, f"{name}: in torchattacks.__all__, not covered here"
    x, y = batch[0][:8], batch[1][:8]
    if name in RGB:
        model, x = Pooled(model).eval(), rgb16(x)

    expected = untargeted_then_random(real_torchattacks, name, model, x, y, loader)
    if name == "AutoAttack":
        expected[0], _ = run_original(copy.deepcopy(model), x, y, monkeypatch, norm="Linf", eps=8 / 255,
                                      steps=2, n_queries=20)
    installed = fastadv.install_as_torchattacks()
    try:
        torchattacks = importlib.import_module("torchattacks")
        assert torchattacks is installed is not real_torchattacks
        assert getattr(torchattacks, name) is getattr(fastadv, name)
        actual = untargeted_then_random(torchattacks, name, model, x, y, loader)
    finally:
        uninstall_torchattacks()
    assert sys.modules["torchattacks"] is real_torchattacks
    assert importlib.import_module("torchattacks").PGD is real_torchattacks.PGD

    assert_matches(name, model, actual[0], expected[0], x, y, f"{name} untargeted")
    assert name == "VANILA" or not torch.equal(actual[0], x), f"{name}: the attack did nothing"
    if expected[1] is None:
        assert actual[1] is None, f"{name}: torchattacks cannot be targeted, fastadv can"
    else:
        assert actual[1] is not None, f"{name}: torchattacks can be targeted, fastadv raised"
        assert_matches(name, model, actual[1], expected[1], x, y, f"{name} targeted random")
