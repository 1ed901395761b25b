"""Adversarial training building blocks: every method trains, the attack leaves no
parameter gradient, BatchNorm stays in eval while crafting, AMP and wrappers work."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from fastadv.models import MLP, SmallCNN
from fastadv.train import (
    METHODS, TrainConfig, Trainer, accuracy, attack_view, craft, crafting, fgsm_rs_examples, fit,
    pgd_examples, trades_examples,
)

EPS = 0.2


def fresh(model_cls=SmallCNN, seed=0):
    torch.manual_seed(seed)
    return model_cls()


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def changed(before, model):
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def assert_in_ball(adv, x, eps):
    assert adv.dtype == x.dtype == torch.float32
    assert (adv - x).abs().max().item() <= eps + 1e-6
    assert adv.min().item() >= 0 and adv.max().item() <= 1


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_a_step_and_changes_parameters(method, batch):
    x, y = batch
    model = fresh()
    before = params_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = Trainer(model, opt, TrainConfig(method=method, eps=EPS, steps=3, replays=2)).step(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert changed(before, model)
    assert model.training  # the outer step leaves the model in train mode


@pytest.mark.parametrize("method", ["pgd", "fgsm-rs", "trades"])
def test_crafting_leaves_no_parameter_grad_and_restores_flags(method, batch):
    x, y = batch
    model = fresh()
    model.train()
    frozen = model.features[0].bias
    frozen.requires_grad_(False)  # a frozen parameter stays frozen
    adv = craft(model, x, y, TrainConfig(method=method, eps=EPS, steps=3))
    assert all(p.grad is None for p in model.parameters()), "the attack accumulated parameter gradients"
    assert not frozen.requires_grad and all(p.requires_grad for p in model.parameters() if p is not frozen)
    assert model.training and all(m.training for m in model.modules())
    assert_in_ball(adv, x, EPS)


def test_crafting_keeps_existing_grads_untouched(batch):
    x, y = batch
    model = fresh()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    pgd_examples(model, x, y, eps=EPS, alpha=0.05, steps=3)
    trades_examples(model, x, eps=EPS, alpha=0.05, steps=3)
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)


def _bn_probe(model):
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: seen.append(mod.training))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    return seen, hooks


@pytest.mark.parametrize("method", ["pgd", "fgsm-rs", "trades"])
def test_batchnorm_in_eval_while_crafting_unless_asked(method, batch):
    x, y = batch
    model = fresh()
    model.train()
    stats = copy.deepcopy({k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k})
    seen, hooks = _bn_probe(model)
    craft(model, x, y, TrainConfig(method=method, eps=EPS, steps=2))
    assert seen and not any(seen), "BatchNorm ran in train mode while crafting"
    for k, v in stats.items():
        assert torch.equal(model.state_dict()[k], v), f"crafting changed BatchNorm statistics {k}"
    seen.clear()
    craft(model, x, y, TrainConfig(method=method, eps=EPS, steps=2, bn_training=True))
    for h in hooks:
        h.remove()
    assert seen and all(seen), "bn_training=True did not put BatchNorm in train mode"
    assert model.training


def test_pgd_at_examples_equal_torchattacks_pgd(batch, trained_models):
    import torchattacks

    x, y = batch
    model = trained_models["cnn"]
    torch.manual_seed(3)
    ours = pgd_examples(model, x, y, eps=EPS, alpha=0.05, steps=5)
    torch.manual_seed(3)
    ref = torchattacks.PGD(model, eps=EPS, alpha=0.05, steps=5)(x, y)
    assert torch.equal(ours, ref)


def torchattacks_epoch(model, x, y, *, eps, alpha, steps, batch_size, lr, seed):
    """One epoch of PGD-AT as a user writes it with torchattacks.PGD: the batches of fit's
    permutation for (seed, epoch 0), mean cross-entropy, SGD with momentum."""
    import torchattacks
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1_000_003))
    for idx in order.split(batch_size):
        model.train()
        adv = atk(x[idx], y[idx])
        opt.zero_grad()
        F.cross_entropy(model(adv), y[idx]).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("model_cls", [SmallCNN, MLP])
def test_fit_epoch_equals_the_torchattacks_loop(model_cls, digits):
    """fit's whole update, not only its examples: one epoch's weights equal, bit for bit, the
    hand-written torchattacks loop's from the same seed (batches of 32: the mean's 1/N and
    fit's scaled sum are the same number when N is a power of two)."""
    (x, y), _ = digits
    x, y = x[:160], y[:160]
    settings = dict(eps=0.1, alpha=0.03, steps=3, batch_size=32, lr=0.05, seed=0)
    ours, ref = fresh(model_cls), fresh(model_cls)
    torch.manual_seed(7)
    fit(ours, x, y, TrainConfig(method="pgd", eps=settings["eps"], alpha=settings["alpha"], steps=settings["steps"]),
        epochs=1, batch_size=32, optimizer="sgd", lr=settings["lr"], schedule="constant", seed=0)
    torch.manual_seed(7)
    torchattacks_epoch(ref, x, y, **settings)
    assert changed(params_of(fresh(model_cls)), ours)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after one epoch (max {(a.float() - b.float()).abs().max()})"


def test_fgsm_rs_is_one_projected_step_from_a_uniform_start(batch, trained_models):
    import torchattacks

    x, y = batch
    model = trained_models["cnn"]
    torch.manual_seed(4)
    ours = fgsm_rs_examples(model, x, y, eps=EPS)
    torch.manual_seed(4)
    ref = torchattacks.PGD(model, eps=EPS, alpha=1.25 * EPS, steps=1, random_start=True)(x, y)
    assert torch.equal(ours, ref)


def test_trades_examples_equal_torchattacks_tpgd(batch, trained_models):
    import torchattacks

    x, y = batch
    model = trained_models["cnn"]
    torch.manual_seed(5)
    ours = trades_examples(model, x, eps=EPS, alpha=0.05, steps=5)
    torch.manual_seed(5)
    ref = torchattacks.TPGD(model, eps=EPS, alpha=0.05, steps=5)(x)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("method", METHODS)
def test_amp_bf16_path_runs(method, batch):
    x, y = batch
    model = fresh()
    before = params_of(model)
    cfg = TrainConfig(method=method, eps=EPS, steps=2, replays=2, amp="bf16")
    if method not in ("plain", "free"):
        adv = craft(model, x, y, cfg)
        assert_in_ball(adv, x, EPS)  # the perturbation state stays fp32
        assert all(p.grad is None for p in model.parameters())
    loss = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg).step(x, y)
    assert torch.isfinite(loss) and changed(before, model)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_free_at_replays_m_optimizer_steps_and_keeps_delta_in_the_ball(batch):
    x, y = batch
    model = fresh()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    trainer = Trainer(model, opt, TrainConfig(method="free", eps=EPS, replays=3))
    trainer.step(x, y)
    trainer.step(x[:10], y[:10])  # a smaller last batch reuses the head of the delta
    assert len(calls) == 6
    assert trainer._delta.abs().max().item() <= EPS + 1e-7 and trainer._delta.abs().max().item() > 0


def test_compiled_model_trains(batch):
    x, y = batch
    model = fresh()
    compiled = torch.compile(model, backend="eager")
    assert attack_view(compiled) is compiled
    before = params_of(model)
    Trainer(compiled, torch.optim.SGD(model.parameters(), lr=0.1), TrainConfig(method="pgd", eps=EPS, steps=2)).step(x, y)
    assert changed(before, model) and all(p.grad is not None for p in model.parameters())


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, so DistributedDataParallel can wrap a model in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("method", ["pgd", "trades", "fgsm-rs", "free"])
def test_ddp_attack_never_reaches_the_reducer(method, batch, process_group):
    """Under DDP the attack runs on the inner module: the gradient buckets are all-reduced
    exactly once per training backward (m times for Free AT), never for attack steps,
    and the step equals the same step on the bare model."""
    x, y = batch
    model, bare = fresh(MLP), fresh(MLP)
    ddp = nn.parallel.DistributedDataParallel(model)
    assert attack_view(ddp) is model
    reduced = []

    def hook(state, bucket):
        reduced.append(1)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, hook)
    cfg = TrainConfig(method=method, eps=EPS, steps=4, replays=2, random_start=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    Trainer(ddp, opt, TrainConfig(method="plain")).step(x, y)
    per_backward = len(reduced)
    assert per_backward >= 1
    Trainer(bare, torch.optim.SGD(bare.parameters(), lr=0.1), TrainConfig(method="plain")).step(x, y)
    reduced.clear()
    torch.manual_seed(1)
    Trainer(ddp, opt, cfg).step(x, y)
    assert len(reduced) == per_backward * (cfg.replays if method == "free" else 1)
    torch.manual_seed(1)
    Trainer(bare, torch.optim.SGD(bare.parameters(), lr=0.1), cfg).step(x, y)
    for a, b in zip(model.parameters(), bare.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fit_trains_pgd_at_on_digits(digits):
    (x, y), (xt, yt) = digits
    model = fresh()
    history = fit(model, x[:512], y[:512], TrainConfig(method="fgsm-rs", eps=EPS), epochs=3, batch_size=64, seed=0)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert not model.training
    assert accuracy(model, xt, yt) > 0.6


def test_config_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown training method 'madry'"):
        TrainConfig(method="madry")
    with pytest.raises(ValueError, match="eps must be a number > 0"):
        TrainConfig(method="pgd", eps=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(method="pgd", eps=0.1, amp="fp8")
    assert TrainConfig(method="fgsm-rs", eps=0.2).step_size == pytest.approx(0.25)
    assert TrainConfig(method="pgd", eps=0.2, steps=10).step_size == pytest.approx(0.05)
    assert TrainConfig(method="free", eps=0.2).step_size == pytest.approx(0.2)


def test_crafting_context_restores_modes_on_error():
    model = fresh()
    model.train()
    with pytest.raises(RuntimeError):
        with crafting(model) as net:
            assert not net.training and not any(p.requires_grad for p in net.parameters())
            raise RuntimeError("boom")
    assert model.training and all(p.requires_grad for p in model.parameters())
