"""APGD and APGD-T against their references, on the trained digits models.

- 'torchattacks' arithmetic: torch.equal to torchattacks 3.5.1 APGD / APGDT (same
  seed) for Linf and L2, ce and dlr, steps 10 and 25 (checkpoints and step
  halving), 1 and 2 restarts.
- 'original' arithmetic: torch.equal to pyautoattack 0.2.0 APGDAttack /
  APGDAttack_targeted (so the robust flags agree on every sample).
- The caller's global RNG is never touched; invariants; bad input.
- The Triton kernels (through the interpreter) in the full attack: Linf bit-exact
  with the 'torch' backend, L2 within L2_KERNEL_ATOL (1e-6 in fp32).
"""
import pytest
import torch
import torchattacks

import fastadv
from fastadv import functional as F
from fastadv.attacks.apgd import apgd_loop, apgd_single_run, checkpoint_schedule, oscillation_threshold
from fastadv.attacks.apgdt import apgdt_loop
from helpers import L2_KERNEL_ATOL, assert_close, assert_equal

EPS = {"Linf": 0.1, "L2": 0.5}  # budgets that fool about half of the digits


@pytest.fixture
def small(digits):
    """48 test digits: enough for mixed robust / fooled samples, fast on two cores."""
    _, (x, y) = digits
    return x[:48].clone(), y[:48].clone()


def predict(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


# -- bit-exact with torchattacks -------------------------------------------------------------


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("n_restarts", [1, 2])
def test_apgd_equals_torchattacks(model, small, norm, loss, steps, n_restarts):
    x, y = small
    kwargs = dict(norm=norm, eps=EPS[norm], steps=steps, n_restarts=n_restarts, loss=loss, seed=3)
    expected = torchattacks.APGD(model, **kwargs)(x, y)
    actual = fastadv.APGD(model, **kwargs)(x, y)
    assert_equal(actual, expected, str(kwargs))
    fooled = predict(model, actual) != y
    assert 0 < fooled.sum() < len(y)  # restarts and halving act on a mixed batch


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("steps,n_restarts,n_classes", [(10, 1, 10), (25, 2, 4)])
def test_apgdt_equals_torchattacks(model, small, norm, steps, n_restarts, n_classes):
    x, y = small
    kwargs = dict(norm=norm, eps=EPS[norm], steps=steps, n_restarts=n_restarts, n_classes=n_classes, seed=1)
    expected = torchattacks.APGDT(model, **kwargs)(x, y)
    assert_equal(fastadv.APGDT(model, **kwargs)(x, y), expected, str(kwargs))


def test_functions_equal_classes(trained_models, small):
    x, y = small
    model = trained_models["mlp"]
    assert_equal(F.apgd(model, x, y, norm="L2", eps=0.5, loss="dlr"), fastadv.APGD(model, norm="L2", eps=0.5, loss="dlr")(x, y))
    assert_equal(F.apgdt(model, x, y, eps=0.1, n_classes=5), fastadv.APGDT(model, eps=0.1, n_classes=5)(x, y))


def test_perturb_best_loss_equals_torchattacks(trained_models, small):
    """perturb(best_loss=True) draws from the global RNG, unseeded, as the reference does."""
    x, y = small
    model = trained_models["mlp"]
    torch.manual_seed(7)
    loss_ref, adv_ref = torchattacks.APGD(model, eps=0.1, steps=12, n_restarts=2, loss="dlr").perturb(x, y, best_loss=True)
    torch.manual_seed(7)
    loss, adv = fastadv.APGD(model, eps=0.1, steps=12, n_restarts=2, loss="dlr").perturb(x, y, best_loss=True)
    assert_equal(loss, loss_ref)
    assert_equal(adv, adv_ref)


def test_normalization_round_trip_equals_torchattacks(trained_models, small):
    x, y = small
    model = trained_models["mlp"]
    mean, std = [0.3], [0.4]
    xn = (x - 0.3) / 0.4
    ref = torchattacks.APGD(model, eps=0.1)
    ref.set_normalization_used(mean, std)
    atk = fastadv.APGD(model, eps=0.1)
    atk.set_normalization_used(mean, std)
    assert_equal(atk(xn, y), ref(xn, y))


# -- the original arithmetic (pyautoattack 0.2.0) --------------------------------------------


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("loss", ["ce", "dlr", "targeted"])
def test_original_arithmetic_equals_pyautoattack(model, small, norm, loss):
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    x, y = small
    common = dict(n_iter=25, norm=norm, eps=EPS[norm], seed=5)
    state = torch.get_rng_state()
    if loss == "targeted":
        expected = APGDAttack_targeted(model, n_restarts=1, n_target_classes=9, **common).perturb(x.clone(), y.clone())
        adv, robust = apgdt_loop(model, x, y, n_target_classes=9, n_restarts=1, arithmetic="original", **common)
    else:
        expected = APGDAttack(model, n_restarts=2, loss=loss, **common).perturb(x.clone(), y.clone())
        adv, robust = apgd_loop(model, x, y, n_restarts=2, loss=loss, arithmetic="original", **common)
    torch.set_rng_state(state)  # pyautoattack re-seeds the global RNG
    assert_equal(adv, expected)
    robust_ref = predict(model, expected) == y
    assert torch.equal(robust, robust_ref)
    assert 0 < robust.sum() < len(y)


def test_original_and_torchattacks_arithmetics_differ_only_in_rounding(trained_models, small):
    x, y = small
    model = trained_models["cnn"]
    a, ra = apgd_loop(model, x, y, norm="L2", eps=0.5, n_iter=10)
    b, rb = apgd_loop(model, x, y, norm="L2", eps=0.5, n_iter=10, arithmetic="original")
    assert (ra == rb).float().mean() >= 0.9
    assert (a - b).abs().max() < 0.5


def test_oscillation_threshold_and_schedule():
    assert checkpoint_schedule(10) == (2, 1, 1)
    assert checkpoint_schedule(100) == (22, 6, 3)
    assert checkpoint_schedule(0) == (1, 1, 1)
    assert oscillation_threshold(4, 0.75, "torchattacks") == oscillation_threshold(4, 0.75, "original") == 3
    # count <= k * rho: torchattacks compares in float64, pyautoattack against fp32(k * rho)
    assert oscillation_threshold(3, 0.99999999999, "torchattacks") == 2
    assert oscillation_threshold(3, 0.99999999999, "original") == 3


# -- randomness ------------------------------------------------------------------------------


def test_global_rng_untouched_and_draws_match_the_reference(trained_models, small):
    x, y = small
    model = trained_models["cnn"]
    torch.manual_seed(123)
    torch.rand(5)  # some state the attack must leave alone
    state = torch.get_rng_state()
    adv = fastadv.APGD(model, norm="L2", eps=0.5, n_restarts=2, seed=9)(x, y)
    advt = fastadv.APGDT(model, eps=0.1, n_classes=3, seed=9)(x, y)
    g = torch.Generator().manual_seed(9)  # an explicit generator is used and advanced
    a1, _ = apgd_loop(model, x, y, eps=0.1, generator=g)
    a2, _ = apgd_loop(model, x, y, eps=0.1, generator=g)
    assert not torch.equal(a1, a2)
    assert torch.equal(torch.get_rng_state(), state)
    # whatever the global state was, the result is the reference's with the same seed
    assert_equal(adv, torchattacks.APGD(model, norm="L2", eps=0.5, n_restarts=2, seed=9)(x, y))
    assert_equal(advt, torchattacks.APGDT(model, eps=0.1, n_classes=3, seed=9)(x, y))


# -- invariants ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ["APGD", "APGDT"])
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_invariants(trained_models, small, cls, norm):
    x, y = small
    model = trained_models["cnn"]
    model.train()  # the attack runs in eval mode and restores this
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    x0, y0 = x.clone(), y.clone()
    state = torch.get_rng_state()
    kwargs = dict(norm=norm, eps=EPS[norm], steps=10)
    if cls == "APGDT":
        kwargs["n_classes"] = 4
    try:
        adv = getattr(fastadv, cls)(model, **kwargs)(x, y)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    assert [p.requires_grad for p in model.parameters()] == flags
    for p, g in zip(model.parameters(), grads):  # parameter gradients untouched
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert torch.equal(torch.get_rng_state(), state)
    assert adv.shape == x.shape and adv.dtype == x.dtype and adv.device == x.device
    assert adv.min() >= 0 and adv.max() <= 1
    d = (adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    assert (size <= EPS[norm] + 1e-5).all()
    fooled = predict(model, adv) != y
    clean_wrong = predict(model, x) != y
    assert fooled.any() and (~fooled).any()
    assert torch.equal(adv[~fooled], x[~fooled])  # a sample the attack fails on comes back clean
    assert torch.equal(adv[clean_wrong], x[clean_wrong])


def test_loop_returns_robust_flags(trained_models, small):
    x, y = small
    model = trained_models["mlp"]
    for loop, kw in ((apgd_loop, {"loss": "dlr"}), (apgdt_loop, {"n_target_classes": 3})):
        adv, robust = loop(model, x, y, eps=0.1, n_iter=10, **kw)
        assert robust.dtype == torch.bool and robust.shape == y.shape
        assert torch.equal(robust, predict(model, adv) == y)
    # a given robust mask restricts the attack to those samples
    only = torch.zeros_like(y, dtype=torch.bool)
    only[:5] = True
    adv, robust = apgd_loop(model, x, y, eps=0.1, robust=only)
    assert torch.equal(adv[5:], x[5:]) and not robust[5:].any()
    adv, robust = apgdt_loop(model, x, y, eps=0.1, robust=only, n_target_classes=3)
    assert torch.equal(adv[5:], x[5:]) and not robust[5:].any()
    with pytest.raises(ValueError, match="n_classes"):  # checked on the first forward, a subset's
        apgdt_loop(model, x, y, eps=0.1, robust=only, n_target_classes=10)


def test_single_run_outputs(trained_models, small):
    x, y = small
    model = trained_models["mlp"]
    x_best, robust, loss_best, x_best_adv = apgd_single_run(
        model, x, y, eps=0.1, n_iter=10, loss="ce", generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        loss_at_best = torch.nn.functional.cross_entropy(model(x_best), y, reduction="none")
    assert_close(loss_at_best, loss_best, 1e-5)
    assert torch.equal(~robust, predict(model, x_best_adv) != y)
    assert ((x_best - x).abs().amax((1, 2, 3)) <= 0.1 + 1e-6).all()


def test_per_sample_eps(trained_models, small):
    x, y = small
    model = trained_models["cnn"]
    for norm, scale in (("Linf", 0.1), ("L2", 0.5)):
        same = F.apgd(model, x, y, norm=norm, eps=torch.full((len(y),), scale))
        assert_equal(same, F.apgd(model, x, y, norm=norm, eps=scale))
        eps = torch.linspace(0, 2 * scale, len(y))
        adv = F.apgd(model, x, y, norm=norm, eps=eps, steps=10)
        d = (adv - x).flatten(1)
        size = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
        assert (size <= eps + 1e-5).all()
        assert torch.equal(adv[0], x[0])  # eps = 0
        advt = F.apgdt(model, x, y, norm=norm, eps=eps, n_classes=3)
        d = (advt - x).flatten(1)
        assert ((d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)) <= eps + 1e-5).all()


def test_eot_and_verbose(trained_models, small, capsys):
    x, y = small
    model = trained_models["mlp"]
    kwargs = dict(eps=0.1, steps=5, eot_iter=2, n_restarts=2, verbose=True)
    assert_equal(fastadv.APGD(model, **kwargs)(x, y), torchattacks.APGD(model, **kwargs)(x, y))
    out = capsys.readouterr().out
    assert "restart 1" in out and "iteration: 4" in out


def test_fast_mode_stays_in_budget(trained_models, small):
    x, y = small
    model = trained_models["cnn"]
    adv = fastadv.APGD(model, norm="Linf", eps=0.1, precision="bf16")(x, y)
    assert ((adv - x).abs().amax((1, 2, 3)) <= 0.1 + 1e-6).all()
    assert (predict(model, adv) != y).any()


def test_empty_batch_and_zero_steps(trained_models, small):
    x, y = small
    model = trained_models["mlp"]
    assert fastadv.APGD(model)(x[:0], y[:0]).shape == (0, 1, 8, 8)
    assert_equal(fastadv.APGD(model, steps=0)(x, y), torchattacks.APGD(model, steps=0)(x, y))


# -- the kernels in the attack (Triton interpreter) ------------------------------------------


@pytest.mark.interpreter
def test_interpreted_kernels_in_the_attack(trained_models, digits):
    _, (x, y) = digits
    x, y = x[:12], y[:12]
    model = trained_models["mlp"]
    linf = dict(norm="Linf", eps=0.1, steps=10, n_restarts=2)
    assert_equal(F.apgd(model, x, y, backend="interpret", **linf), F.apgd(model, x, y, backend="torch", **linf))
    lt = dict(norm="Linf", eps=0.1, steps=6, n_classes=3)
    assert_equal(F.apgdt(model, x, y, backend="interpret", **lt), F.apgdt(model, x, y, backend="torch", **lt))
    # L2: the kernel sums each sample's squares in another order than torch.norm (measured after 6
    # steps: at most 1.8e-7 on the digits CNN and MLP), within the L2 kernels' fp32 bound.
    for arithmetic in ("torchattacks", "original"):
        l2 = dict(norm="L2", eps=0.5, steps=6, arithmetic=arithmetic)
        assert_close(F.apgd(model, x, y, backend="interpret", **l2), F.apgd(model, x, y, backend="torch", **l2),
                     L2_KERNEL_ATOL[torch.float32])
        l2t = dict(l2, n_classes=3)
        assert_close(F.apgdt(model, x, y, backend="interpret", **l2t), F.apgdt(model, x, y, backend="torch", **l2t),
                     L2_KERNEL_ATOL[torch.float32])


# -- bad input -------------------------------------------------------------------------------


def _apgd(model, **kw):
    return lambda x, y: fastadv.APGD(model, **kw)(x, y)


def _apgdt(model, **kw):
    return lambda x, y: fastadv.APGDT(model, **kw)(x, y)


BAD = [
    (dict(norm="L1"), ValueError, "norm"),
    (dict(norm="linf"), ValueError, "norm"),
    (dict(loss="hinge"), ValueError, "loss"),
    (dict(steps=-1), ValueError, "steps"),
    (dict(steps=2.5), TypeError, "steps"),
    (dict(eps=-0.1), ValueError, "eps"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(n_restarts=0), ValueError, "n_restarts"),
    (dict(eot_iter=0), ValueError, "eot_iter"),
    (dict(rho="high"), TypeError, "rho"),
    (dict(seed="zero"), TypeError, "seed"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD)
def test_bad_arguments(trained_models, kwargs, exc, match):
    model = trained_models["mlp"]
    with pytest.raises(exc, match=match):
        fastadv.APGD(model, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != "loss"}
    if kwargs:
        with pytest.raises(exc, match=match):
            fastadv.APGDT(model, **kwargs)


def test_bad_input(trained_models, small):
    x, y = small
    model = trained_models["mlp"]
    with pytest.raises(ValueError, match="n_classes"):
        fastadv.APGDT(model, n_classes=1)
    with pytest.raises(ValueError, match="n_classes"):  # the model has 10 classes
        fastadv.APGDT(model, n_classes=11)(x, y)
    with pytest.raises(ValueError, match="n_classes"):
        F.apgdt(model, x, y, n_classes=12)
    with pytest.raises(ValueError, match="norm"):
        F.apgd(model, x, y, norm="L0")
    with pytest.raises(ValueError, match="arithmetic"):
        F.apgd(model, x, y, arithmetic="fast")
    with pytest.raises(ValueError, match="eps"):
        F.apgd(model, x, y, eps=torch.full((len(y),), -0.1))
    with pytest.raises(ValueError, match="eps"):
        F.apgd(model, x, y, eps=torch.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        fastadv.APGD(model)(x, y + 10)
    with pytest.raises(ValueError, match="images"):
        fastadv.APGD(model)(x + 2, y)
    with pytest.raises(TypeError, match="n_target_classes"):
        apgd_loop(model, x, y, loss="dlr-targeted")
    with pytest.raises(ValueError, match="n_target_classes"):
        apgd_loop(model, x, y, loss="ce", n_target_classes=3)
    two_classes = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    with pytest.raises(ValueError, match="dlr"):
        fastadv.APGD(two_classes, loss="dlr")(x, y % 2)
    with pytest.raises(ValueError, match="4 classes"):
        fastadv.APGDT(two_classes, n_classes=2)(x, y % 2)


# -- CUDA (skipped without a GPU) ------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_kernels_and_no_sync_per_iteration(trained_models, small):
    """The compiled kernels match the twins on CUDA, and the iteration never syncs: the
    number of synchronizing calls does not grow with the number of iterations."""
    import copy
    import warnings

    model = copy.deepcopy(trained_models["cnn"]).cuda()
    x, y = small[0].cuda(), small[1].cuda()
    for norm in ("Linf", "L2"):
        for fn, kw in ((F.apgd, {"loss": "dlr", "n_restarts": 2}), (F.apgdt, {"n_classes": 4})):
            kw = dict(norm=norm, eps=EPS[norm], steps=25, **kw)
            compiled, twin = fn(model, x, y, backend="triton", **kw), fn(model, x, y, backend="torch", **kw)
            if norm == "Linf":
                assert_equal(compiled, twin, str(kw))
            else:
                assert_close(compiled, twin, 1e-5, str(kw))

    def syncs(n_iter):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                apgd_loop(model, x, y, norm="L2", eps=0.5, n_iter=n_iter, n_restarts=2, backend="triton")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(3)  # compile the kernels first
    assert syncs(2) == syncs(20)
