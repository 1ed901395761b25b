"""No host synchronisation per iteration on the path CUDA runs, counted on the CPU.

Each attack runs with backend='triton' on CPU tensors, its kernel launchers swapped
for their PyTorch twins (``host_syncs.on_triton_path``), so the loop code is the
CUDA path's line for line. The ops that would make the host wait for the device are
counted at two step counts: an iterative attack's count must not grow with the steps.
What a call costs once (edge validation, the cascades' robust-point gathers) is pinned
to the numbers below, so a new sync shows up as a failing test.
"""
import pytest
import torch

import fastadv
from fastadv import validation
from host_syncs import Recorder, on_triton_path

LINF, L2 = 0.2, 1.0
# APGDT gathers the robust points once per target class: budgets small enough that some stay
# robust at both step counts keep the number of targets run the same.
LINF_SMALL, L2_SMALL = 0.02, 0.1


@pytest.fixture
def setup(trained_models, digits):
    _, (x, y) = digits
    return trained_models["cnn"], x[:12].clone(), y[:12].clone()


def syncs_of(call):
    recorder = Recorder()
    with on_triton_path(recorder), recorder:
        call()
    return recorder.syncs


ITERATIVE = {
    "PGD": lambda m, s: fastadv.PGD(m, eps=LINF, alpha=0.05, steps=s),
    "PGDL2": lambda m, s: fastadv.PGDL2(m, eps=L2, alpha=0.2, steps=s),
    "MIFGSM": lambda m, s: fastadv.MIFGSM(m, eps=LINF, alpha=0.05, steps=s),
    "TPGD": lambda m, s: fastadv.TPGD(m, eps=LINF, alpha=0.05, steps=s),
    "EOTPGD": lambda m, s: fastadv.EOTPGD(m, eps=LINF, alpha=0.05, steps=s, eot_iter=2),
    "RFGSM": lambda m, s: fastadv.RFGSM(m, eps=LINF, alpha=0.05, steps=s),
    "APGD-Linf-ce": lambda m, s: fastadv.APGD(m, norm="Linf", eps=LINF, steps=s, loss="ce"),
    "APGD-Linf-dlr": lambda m, s: fastadv.APGD(m, norm="Linf", eps=LINF, steps=s, loss="dlr"),
    "APGD-L2-ce": lambda m, s: fastadv.APGD(m, norm="L2", eps=L2, steps=s, loss="ce"),
    "APGD-L2-dlr": lambda m, s: fastadv.APGD(m, norm="L2", eps=L2, steps=s, loss="dlr"),
    "APGDT-Linf": lambda m, s: fastadv.APGDT(m, norm="Linf", eps=LINF_SMALL, steps=s, n_classes=3),
    "APGDT-L2": lambda m, s: fastadv.APGDT(m, norm="L2", eps=L2_SMALL, steps=s, n_classes=3),
    "FAB-Linf": lambda m, s: fastadv.FAB(m, norm="Linf", eps=LINF, steps=s, n_classes=3),
    "FAB-L2": lambda m, s: fastadv.FAB(m, norm="L2", eps=L2, steps=s, n_classes=3),
    "FAB-Linf-targeted": lambda m, s: fastadv.FAB(m, norm="Linf", eps=LINF, steps=s, n_classes=3, multi_targeted=True),
}


@pytest.mark.parametrize("name", ITERATIVE)
def test_no_sync_per_iteration(setup, name):
    model, x, y = setup
    few, many = (syncs_of(lambda s=s: ITERATIVE[name](model, s)(x, y)) for s in (2, 7))
    assert len(many) == len(few), f"{name}: {len(few)} syncs at 2 steps, {len(many)} at 7: {many}"


# The per-call syncs of the cascades, with every attack at 2 and at 5 steps: AutoAttack's
# come from gathering the points still robust before each sub-attack (and the clean check).
CASCADES = {
    "MultiAttack": lambda m, s: fastadv.MultiAttack([fastadv.PGD(m, eps=LINF, alpha=0.05, steps=s),
                                                     fastadv.APGD(m, eps=LINF, steps=s)]),
    "AutoAttack": lambda m, s: fastadv.AutoAttack(m, eps=LINF, n_classes=10, steps=s, n_queries=s),
}


@pytest.mark.parametrize("name", CASCADES)
def test_cascades_sync_once_per_call(setup, name):
    model, x, y = setup
    few, many = (syncs_of(lambda s=s: CASCADES[name](model, s)(x, y)) for s in (2, 5))
    assert few == many, f"{name}: {len(few)} syncs at 2 steps, {len(many)} at 5"
    print(f"{name}: {len(few)} syncs per call: {few}")


def test_edge_validation_syncs_at_most_once(setup):
    model, x, y = setup
    assert len(syncs_of(lambda: validation.check_images(x))) <= 1
    assert syncs_of(lambda: validation.check_labels(y, x.shape[0])) == []
    logits = model(x)
    assert len(syncs_of(lambda: validation.check_logits(logits, y))) <= 1


def test_recorder_counts_device_syncs_and_not_host_scalars():
    """The counter itself: device reads count, Python-number scalars do not."""
    x = torch.rand(5)
    cases = {
        lambda: x.sum().item(): 1, lambda: bool((x > 0.5).any()): 1, lambda: x[x > 0.5]: 1,
        lambda: x.nonzero(): 1, lambda: x.tolist(): 1, lambda: x.cpu(): 1, lambda: x.to("cpu"): 1, lambda: torch.equal(x, x): 1,
        lambda: float(torch.tensor(0.3, dtype=torch.float32)): 0, lambda: torch.rand(3).sum().item(): 0,
        lambda: torch.where(x > 0.5, x, 0.0): 0, lambda: x[torch.tensor([0, 2])]: 0,
    }
    for call, expected in cases.items():
        recorder = Recorder()
        with recorder:
            call()
        assert len(recorder.syncs) == expected, recorder.syncs
