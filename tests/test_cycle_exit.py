"""The exact early exit (EngineOptions.cycle_exit): the same bits as torchattacks, fewer gradients.

Real models trained on digits in the test session (the plain CNN and MLP of conftest, and a
SmallCNN adversarially trained here with PGD-AT for two epochs), real torchattacks 3.5.1.
Gradient evaluations are counted by wrapping the model (fastadv.calls.CallCounter).
"""
import pytest
import torch
import torchattacks

import fastadv
from fastadv import functional as F
from fastadv import loop, slots
from fastadv.calls import CallCounter
from fastadv.engine import CYCLE_MIN_STEPS
from helpers import assert_equal
from host_syncs import Recorder


@pytest.fixture
def test_digits(digits):
    _, (x, y) = digits
    return x, y


def attack_pair(name, model, x, y, kwargs, setup=lambda atk: None, seed=3):
    """(torchattacks' output, fastadv's with cycle_exit=True, fastadv's gradient evaluations per sample)."""
    counted = CallCounter(model)
    ref = getattr(torchattacks, name)(model, **kwargs)
    ours = getattr(fastadv, name)(counted, cycle_exit=True, **kwargs)
    setup(ref)
    setup(ours)
    torch.manual_seed(seed)
    expected = ref(x, y)
    torch.manual_seed(seed)
    actual = ours(x, y)
    return expected, actual, counted.backwards / x.shape[0]


@pytest.mark.parametrize(
    "steps,eps,alpha,random_start,n,max_fraction",
    [
        (100, 0.2, 0.05, True, 150, 0.30),  # the goals
        (200, 0.1, 0.01, True, 150, 0.25),
        (60, 0.2, 0.05, False, 37, 0.60),
        (45, 8 / 255, 2 / 255, True, 1, 0.80),
    ],
)
def test_pgd_equals_torchattacks_with_fewer_gradients(robust_cnn, test_digits, steps, eps, alpha, random_start, n, max_fraction):
    x, y = test_digits[0][:n], test_digits[1][:n]
    kwargs = dict(eps=eps, alpha=alpha, steps=steps, random_start=random_start)
    expected, actual, grads = attack_pair("PGD", robust_cnn, x, y, kwargs)
    assert_equal(actual, expected, f"PGD{kwargs} n={n}")
    assert grads <= max_fraction * steps, f"{grads:.1f} gradient evaluations per sample of {steps}"


@pytest.mark.parametrize(
    "mode",
    [
        lambda a: a.set_mode_targeted_random(quiet=True),
        lambda a: a.set_mode_targeted_least_likely(kth_min=2, quiet=True),
        lambda a: a.set_mode_targeted_by_label(quiet=True),
    ],
    ids=["random", "least_likely", "by_label"],
)
def test_targeted_modes_equal_torchattacks(model, test_digits, mode):
    x, y = test_digits[0][:63], test_digits[1][:63]
    kwargs = dict(eps=0.2, alpha=0.05, steps=40)
    expected, actual, grads = attack_pair("PGD", model, x, y, kwargs, setup=mode)
    assert_equal(actual, expected)
    assert grads < 40


@pytest.mark.parametrize("name,kwargs", [("RFGSM", dict(eps=0.2, alpha=0.05, steps=40)), ("TPGD", dict(eps=0.2, alpha=0.05, steps=40))])
def test_other_sign_step_attacks_equal_torchattacks(trained_models, test_digits, name, kwargs):
    x, y = test_digits[0][:101], test_digits[1][:101]
    expected, actual, grads = attack_pair(name, trained_models["cnn"], x, y, kwargs)
    assert_equal(actual, expected, name)
    assert grads < 0.8 * kwargs["steps"]


def test_per_sample_eps_and_channels_last_equal_the_plain_run(trained_models, test_digits):
    x, y = test_digits[0][:75], test_digits[1][:75]
    eps = torch.linspace(0.02, 0.3, 75)
    kwargs = dict(eps=eps, alpha=0.04, steps=50)
    for options in ({}, {"channels_last": True}):
        torch.manual_seed(5)
        plain = F.pgd(trained_models["cnn"], x, y, cycle_exit=False, **kwargs, **options)
        counted = CallCounter(trained_models["cnn"])
        torch.manual_seed(5)
        fast = F.pgd(counted, x, y, cycle_exit=True, **kwargs, **options)
        assert_equal(fast, plain, str(options))
        assert counted.backwards < 0.7 * 50 * 75


def test_automatic_mode_is_on_from_the_minimum_steps_on_the_cpu(model, test_digits):
    x, y = test_digits[0][:20], test_digits[1][:20]
    for steps in (CYCLE_MIN_STEPS - 1, 3 * CYCLE_MIN_STEPS):
        counted = CallCounter(model)
        torch.manual_seed(0)
        expected = torchattacks.PGD(model, eps=0.2, alpha=0.05, steps=steps)(x, y)
        torch.manual_seed(0)
        assert_equal(fastadv.PGD(counted, eps=0.2, alpha=0.05, steps=steps)(x, y), expected)
        full = counted.backwards == steps * 20
        assert full == (steps < CYCLE_MIN_STEPS), f"{counted.backwards} gradient evaluations for {steps} steps"


def test_off_where_it_cannot_be_exact(trained_models, test_digits):
    x, y = test_digits[0][:30], test_digits[1][:30]
    net = torch.nn.Sequential(torch.nn.Dropout(0.1), trained_models["mlp"])
    # Dropout in training mode: the reference draws a mask each step; so must we, every step.
    expected, actual, grads = attack_pair(
        "PGD", net, x, y, dict(eps=0.2, alpha=0.05, steps=40),
        setup=lambda a: a.set_model_training_mode(model_training=True, dropout_training=True),
    )
    assert_equal(actual, expected)
    assert grads == 40
    # EOT: per-step randomness by design.
    counted = CallCounter(trained_models["cnn"])
    fastadv.EOTPGD(counted, eps=0.2, alpha=0.05, steps=30, eot_iter=2, cycle_exit=True)(x, y)
    assert counted.backwards == 30 * 2 * 30
    # A plain function: its modes cannot be seen, so automatic mode leaves the exit off.
    calls = []
    fastadv.PGD(lambda a: calls.append(a.shape[0]) or trained_models["cnn"](a), eps=0.2, alpha=0.05, steps=30)(x, y)
    assert sum(calls) == 30 * 30


def test_bad_options_raise():
    with pytest.raises(ValueError, match="cycle_exit"):
        fastadv.engine.EngineOptions(cycle_exit="yes")
    with pytest.raises(ValueError, match="cycle_exit and early_stop"):
        fastadv.engine.EngineOptions(cycle_exit=True, early_stop=True)


# -- the exit itself, on a synthetic iteration whose cycles are known ---------------------------------


class Countdown:
    """A 'gradient' that counts evaluations (in slot rows) and runs on slots like CrossEntropyGradient."""

    def __init__(self):
        self.evaluations = 0

    def __call__(self, adv):
        self.evaluations += adv.shape[0]
        return torch.zeros_like(adv)

    def keep(self, mask):
        pass

    def per_sample(self):
        return {}

    def on_slots(self, buffers):
        return self


def ticker(adv, g, tail, period, out=None):
    """Sample i walks 0, 1, 2, ... and, from tail[i], cycles with period[i]."""
    nxt = adv + 1
    nxt = torch.where(nxt >= (tail + period)[:, None], tail[:, None].to(adv.dtype), nxt)
    return nxt if out is None else out.copy_(nxt)


@pytest.mark.parametrize("size", [1, 4, 7])
@pytest.mark.parametrize("steps", [1, 4, 17, 40, 63, 200])
def test_slots_land_on_the_iterate_each_period_implies(steps, size):
    """Periods beyond the ring (16, 40) close at the power-of-two anchor and step on to the final iterate."""
    tails = torch.tensor([0, 3, 0, 7, 2, 11, 0, 5, 1, 30])
    periods = torch.tensor([1, 1, 2, 3, 5, 8, 15, 16, 40, 1000])  # the last never repeats within 200 steps
    start = torch.zeros(10, 3)
    per_sample = {"tail": tails, "period": periods}
    expected = loop.run(ticker, Countdown(), start.clone(), steps, per_sample)
    grad = Countdown()
    actual = slots.iterate(ticker, grad, start.clone(), steps, per_sample, size=size, cycle_exit=True)
    assert_equal(actual, expected)
    plain = Countdown()
    assert_equal(slots.iterate(ticker, plain, start.clone(), steps, per_sample, size=size, cycle_exit=False), expected)
    ceiling = plain.evaluations  # the same slots without exits, padding counted
    assert grad.evaluations <= ceiling
    if steps >= 63:
        assert grad.evaluations < 0.6 * ceiling, grad.evaluations


@pytest.mark.parametrize("check_every", [3, 16])
@pytest.mark.parametrize("steps", [63, 200])
def test_slots_land_on_the_iterate_each_period_implies_with_checks_apart(steps, check_every):
    """Checks up to the ring's length apart still catch every period, the long ones at the anchor."""
    tails = torch.tensor([0, 3, 0, 7, 2, 11, 0, 5, 1, 30])
    periods = torch.tensor([1, 1, 2, 3, 5, 8, 15, 16, 40, 1000])
    start = torch.zeros(10, 3)
    per_sample = {"tail": tails, "period": periods}
    expected = loop.run(ticker, Countdown(), start.clone(), steps, per_sample)
    grad = Countdown()
    actual = slots.iterate(ticker, grad, start.clone(), steps, per_sample, size=4, cycle_exit=True,
                           check_every=check_every)
    assert_equal(actual, expected)
    plain = Countdown()
    slots.iterate(ticker, plain, start.clone(), steps, per_sample, size=4, cycle_exit=False)
    assert grad.evaluations < 0.7 * plain.evaluations, (grad.evaluations, plain.evaluations)


def test_slot_checks_thin_out_while_nothing_settles():
    """The default schedule: a check after the first step, then twice as far apart after each check
    that found no exit, up to CHECK_EVERY_MAX (samples whose steps ran out leave without one)."""
    start = torch.zeros(4, 2)
    per_sample = {"tail": torch.zeros(4, dtype=torch.long), "period": torch.full((4,), 1000)}
    program = slots.Iterations(size=2, steps=41, update=ticker, make_grad=Countdown().on_slots, cycle_exit=True)
    unit = slots.Unit(4, {"adv": start, **per_sample})
    with Recorder() as rec:
        stats = slots.run(program, [unit])
    assert stats.calls == 82
    base, ceiling = slots.CHECK_EVERY["cpu"], slots.CHECK_EVERY_MAX["cpu"]
    polls, interval = [0], base
    for step in range(1, 83):
        if step - polls[-1] >= interval:
            polls.append(step)
            interval = min(2 * interval, ceiling)
    polls = polls[1:]
    assert len(rec.syncs) == len(polls) < 82 // 4, (rec.syncs, polls)


@pytest.mark.parametrize("check_every", [1, 4])
def test_slots_sync_once_per_check_while_nothing_settles(check_every):
    start = torch.zeros(4, 2)
    per_sample = {"tail": torch.zeros(4, dtype=torch.long), "period": torch.full((4,), 1000)}
    program = slots.Iterations(size=2, steps=41, update=ticker, make_grad=Countdown().on_slots, cycle_exit=True)
    unit = slots.Unit(4, {"adv": start, **per_sample})
    with Recorder() as rec:
        stats = slots.run(program, [unit], check_every=check_every)
    assert stats.calls == 82
    assert len(rec.syncs) == 82 // check_every, rec.syncs  # polls only: the scheduler's bookkeeping is on the host


@pytest.mark.parametrize("steps", [9, 10])
def test_slots_tell_zero_from_negative_zero(steps):
    """0.0 and -0.0 compare equal but are other bits: a sign flip of 0.0 has period 2, not 1."""

    def flip(adv, g, out=None):
        return out.copy_(-adv) if out is not None else -adv

    start = torch.zeros(3, 4)
    expected = loop.run(flip, Countdown(), start.clone(), steps, {})
    actual = slots.iterate(flip, Countdown(), start.clone(), steps, {}, size=2, cycle_exit=True)
    assert torch.equal(actual.signbit(), expected.signbit()), (actual, expected)
