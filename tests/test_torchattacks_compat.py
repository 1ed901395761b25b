"""Code written for torchattacks runs unchanged on fastadv.

- ``fastadv.install_as_torchattacks()``: ``import torchattacks`` and torchattacks' module
  paths resolve to fastadv; a torchattacks-style script (a user's subclass of Attack,
  MultiAttack, save, load) runs unmodified and gives the bits torchattacks gives.
- The base class's surface: ``save`` writes the file torchattacks writes (every option),
  ``load`` reads it back, ``repr`` equals torchattacks', the older method names work,
  ``set_device`` stores what it is given, unknown keywords name the attack, MAIR's
  RobModel normalization is picked up.
"""
import contextlib
import inspect
import io
import re
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torchattacks as real_torchattacks

import fastadv
from fastadv.compat import uninstall_torchattacks
from helpers import assert_equal


@pytest.fixture
def installed():
    """fastadv installed as torchattacks for the test, the real one restored after."""
    module = fastadv.install_as_torchattacks()
    try:
        yield module
    finally:
        uninstall_torchattacks()


def test_install_resolves_every_module_path(installed):
    import torchattacks
    import torchattacks.attacks.pgd
    import torchattacks.wrappers.multiattack
    from torchattacks.attack import Attack
    from torchattacks.attacks.apgdt import APGDT
    from torchattacks.wrappers.multiattack import MultiAttack

    assert torchattacks is installed
    assert Attack is fastadv.Attack and APGDT is fastadv.APGDT and MultiAttack is fastadv.MultiAttack
    assert torchattacks.attacks.pgd.PGD is fastadv.PGD
    assert torchattacks.__wrapper__ == fastadv.__wrapper__ == ["LGV", "MultiAttack"]
    for name in fastadv.__all__:
        if name[0].isupper() and name != "Attack":
            assert getattr(torchattacks, name) is getattr(fastadv, name)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchAttack'"):
        torchattacks.NoSuchAttack


def test_uninstall_restores_the_real_module():
    fastadv.install_as_torchattacks()
    uninstall_torchattacks()
    import torchattacks
    from torchattacks.attack import Attack

    assert torchattacks is real_torchattacks and Attack is real_torchattacks.attack.Attack
    assert sys.modules["torchattacks.attacks.pgd"].PGD is real_torchattacks.PGD


# A torchattacks-style script: a user's subclass of Attack (its own forward, using
# get_logits and get_target_label), MultiAttack, save and load. Run once on the real
# torchattacks and once after install_as_torchattacks(), unmodified.
SCRIPT = '''
import torch
import torch.nn as nn
import torchattacks
from torchattacks.attack import Attack
from torchattacks.wrappers.multiattack import MultiAttack


class MyFGSM(Attack):
    def __init__(self, model, eps=8 / 255):
        super().__init__("MyFGSM", model)
        self.eps = eps
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        if self.targeted:
            target_labels = self.get_target_label(images, labels)
        loss = nn.CrossEntropyLoss()
        images.requires_grad = True
        outputs = self.get_logits(images)
        cost = -loss(outputs, target_labels) if self.targeted else loss(outputs, labels)
        grad = torch.autograd.grad(cost, images, retain_graph=False, create_graph=False)[0]
        return torch.clamp(images + self.eps * grad.sign(), min=0, max=1).detach()


results = {}
mine = MyFGSM(model, eps=0.1)
results["subclass"] = mine(images, labels)
mine.set_mode_targeted_by_function(lambda x, y: (y + 1) % 10, quiet=True)
results["subclass_targeted"] = mine(images, labels)
multi = MultiAttack([torchattacks.FGSM(model, eps=0.05), torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=3)])
torch.manual_seed(3)
results["multiattack"] = multi(images, labels)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=16)
pgd = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=3)
torch.manual_seed(4)
results["save_verbose"] = pgd.save(loader, save_path, verbose=False, return_verbose=True, save_predictions=True)
results["saved"] = torch.load(save_path)
results["loaded"] = [b for b in torchattacks.PGD.load(save_path, batch_size=20, load_predictions=True)]
'''


def run_script(model, images, labels, save_path):
    scope = {"model": model, "images": images, "labels": labels, "save_path": str(save_path)}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(SCRIPT, "torchattacks_style_script", "exec"), scope)
    return scope["results"]


def test_torchattacks_script_runs_unchanged(model, batch, tmp_path):
    x, y = batch
    expected = run_script(model, x, y, tmp_path / "reference.pt")
    fastadv.install_as_torchattacks()
    try:
        actual = run_script(model, x, y, tmp_path / "fastadv.pt")
    finally:
        uninstall_torchattacks()
    for key in ("subclass", "subclass_targeted", "multiattack"):
        assert_equal(actual[key], expected[key], key)
    rob_acc, l2, _ = actual["save_verbose"]
    assert (rob_acc, l2) == expected["save_verbose"][:2]
    assert actual["saved"].keys() == expected["saved"].keys()
    for key, value in expected["saved"].items():
        assert (torch.equal(actual["saved"][key], value) if isinstance(value, torch.Tensor)
                else actual["saved"][key] == value), key
    assert len(actual["loaded"]) == len(expected["loaded"])
    for a, e in zip(actual["loaded"], expected["loaded"]):
        for ta, te in zip(a, e):
            assert_equal(ta, te, "loaded batch")


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("options", [
    dict(),
    dict(save_type="int"),
    dict(save_predictions=True, save_clean_inputs=True),
    dict(save_predictions=True, save_clean_inputs=True, save_type="int"),
])
def test_save_writes_the_reference_file(options, normalized, trained_models, batch, tmp_path):
    model = trained_models["cnn"]
    x, y = batch
    if normalized:  # the model takes normalized inputs; the attack gets and returns normalized data
        mean, std = [0.3], [0.4]
        model = nn.Sequential(_Unnormalize(mean, std), model)
        x = (x - mean[0]) / std[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=24)
    printed = {}
    for lib in (real_torchattacks, fastadv):
        atk = lib.PGD(model, eps=0.1, alpha=0.02, steps=2)
        if normalized:
            atk.set_normalization_used(mean, std)
        torch.manual_seed(5)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            atk.save(loader, tmp_path / f"{lib.__name__}.pt", **options)
        printed[lib.__name__] = out.getvalue()
    expected = torch.load(tmp_path / "torchattacks.pt")
    actual = torch.load(tmp_path / "fastadv.pt")
    assert list(actual) == list(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert_equal(actual[key], value, key)
        else:
            assert actual[key] == value
    # Progress lines agree but for the seconds each batch took.
    mask = lambda s: re.sub(r"\(\d+\.\d+ it/s\)", "(t)", s)
    assert mask(printed["fastadv"]) == mask(printed["torchattacks"])
    assert "Robust accuracy" in printed["fastadv"]


class _Unnormalize(nn.Module):
    """Undo (x - mean) / std in front of a model trained on [0, 1] images."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = mean[0], std[0]

    def forward(self, x):
        return x * self.std + self.mean


@pytest.mark.parametrize("options", [dict(), dict(normalize={"mean": [0.5], "std": [0.25]}, load_clean_inputs=True)])
def test_load_reads_what_save_wrote(options, trained_models, batch, tmp_path):
    x, y = batch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    atk = fastadv.FGSM(trained_models["mlp"], eps=0.1)
    with contextlib.redirect_stdout(io.StringIO()):
        atk.save(loader, tmp_path / "adv.pt", verbose=False, save_clean_inputs=True, save_type="int")
        ours = list(fastadv.Attack.load(tmp_path / "adv.pt", batch_size=10, **options))
        theirs = list(real_torchattacks.attack.Attack.load(tmp_path / "adv.pt", batch_size=10, **options))
    assert len(ours) == len(theirs) == 7
    for a, e in zip(ours, theirs):
        assert len(a) == len(e)
        for ta, te in zip(a, e):
            assert_equal(ta, te, "loaded")


def test_save_and_load_bad_input(trained_models, batch, tmp_path):
    atk = fastadv.FGSM(trained_models["mlp"])
    x, y = batch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    with pytest.raises(ValueError, match="save_type"):
        atk.save(loader, tmp_path / "a.pt", save_type="double")
    with pytest.raises(ValueError, match="no batch"):
        atk.save([], tmp_path / "a.pt")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a file written by Attack.save"):
        fastadv.Attack.load(tmp_path / "other.pt")
    with contextlib.redirect_stdout(io.StringIO()):
        atk.save(loader, tmp_path / "plain.pt", verbose=False)
    with pytest.raises(ValueError, match="has no preds"):
        fastadv.Attack.load(tmp_path / "plain.pt", load_predictions=True)


def test_to_type():
    x = torch.tensor([0.0, 0.5, 0.999, 1.0])
    assert_equal(fastadv.Attack.to_type(x, "int"), real_torchattacks.attack.Attack.to_type(x, "int"))
    u = torch.tensor([0, 127, 255], dtype=torch.uint8)
    assert_equal(fastadv.Attack.to_type(u, "float"), real_torchattacks.attack.Attack.to_type(u, "float"))
    with pytest.raises(ValueError, match="not a valid type"):
        fastadv.Attack.to_type(x, "double")


REPR_CASES = [
    ("FGSM", {}), ("PGD", dict(eps=0.1, steps=3)), ("PGDL2", {}), ("MIFGSM", {}), ("TPGD", {}), ("EOTPGD", {}),
    ("FFGSM", {}), ("RFGSM", {}), ("CW", dict(c=2)), ("DeepFool", {}), ("APGD", dict(loss="dlr")), ("APGDT", {}),
    ("FAB", {}), ("Square", {}),
]


@pytest.mark.parametrize("name,kwargs", REPR_CASES, ids=[c[0] for c in REPR_CASES])
def test_repr_equals_torchattacks(name, kwargs, trained_models):
    model = trained_models["cnn"]
    assert repr(getattr(fastadv, name)(model, **kwargs)) == repr(getattr(real_torchattacks, name)(model, **kwargs))


def test_repr_of_multiattack_equals_torchattacks(trained_models, batch):
    model = trained_models["cnn"]
    x, y = batch
    texts = []
    for lib in (real_torchattacks, fastadv):
        atk = lib.MultiAttack([lib.FGSM(model, eps=0.05), lib.PGD(model, eps=0.1, steps=2)])
        atk(x, y)
        texts.append(repr(atk))
    assert texts[0] == texts[1]


def test_repr_shows_engine_options_only_when_set(trained_models):
    model = trained_models["cnn"]
    plain = repr(fastadv.PGD(model))
    assert "engine" not in plain and "backend" not in plain
    tuned = repr(fastadv.PGD(model, backend="torch", precision="bf16"))
    assert "backend=torch" in tuned and "precision='bf16'" in tuned
    assert tuned.startswith(plain[:-1])  # the reference's fields first, in its order


def test_unknown_keyword_names_the_attack(trained_models):
    with pytest.raises(TypeError, match=r"PGD\(\) got an unexpected keyword argument 'iters'") as err:
        fastadv.PGD(trained_models["cnn"], iters=40)
    assert "eps, alpha, steps, random_start" in str(err.value) and "precision" in str(err.value)
    assert "EngineOptions" not in str(err.value)


def test_set_device_stores_what_it_is_given(trained_models):
    for lib in (real_torchattacks, fastadv):
        atk = lib.FGSM(trained_models["mlp"])
        atk.set_device("cpu")
        assert atk.device == "cpu" and isinstance(atk.device, str)


def test_older_method_names(trained_models, batch):
    model = trained_models["cnn"]
    x, y = batch
    atk = fastadv.PGD(model, eps=0.1, alpha=0.02, steps=2, random_start=False)
    with pytest.warns(DeprecationWarning):
        atk.set_return_type("int")
    out = atk(x, y)
    assert out.dtype == torch.uint8
    atk._return_type = "float"
    assert_equal(out, (atk(x, y) * 255).type(torch.uint8))
    with pytest.raises(ValueError, match="not a valid type"):
        atk.set_return_type("double")
    with pytest.warns(DeprecationWarning):
        atk.set_mode_targeted()
    assert atk.attack_mode == "targeted(label)"
    with pytest.warns(DeprecationWarning):
        atk.set_mode_targeted(lambda images, labels: (labels + 1) % 10)
    assert atk.attack_mode == "targeted(custom)"
    with pytest.warns(DeprecationWarning):
        atk.set_mode_least_likely(2)
    assert atk.attack_mode == "targeted(least-likely)" and atk._kth_min == 2
    with pytest.warns(DeprecationWarning):
        atk.set_training_mode(True)
    assert atk._model_training is True


class RobModel(nn.Module):
    """MAIR's wrapper: a model with its normalization as mean/std attributes."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def forward(self, x):
        return self.model((x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1))


@pytest.mark.parametrize("mean,std,used", [([0.5], [0.25], True), ([0.0], [1.0], False)])
def test_mair_robmodel_normalization(mean, std, used, trained_models, batch):
    model = RobModel(trained_models["cnn"], mean, std)
    x, y = batch
    theirs, ours = real_torchattacks.FGSM(model, eps=0.1), fastadv.FGSM(model, eps=0.1)
    assert (ours.normalization_used is not None) == (theirs.normalization_used is not None) == used
    if used:
        assert_equal(ours.normalization_used["mean"], theirs.normalization_used["mean"].float())
        xn = (x - mean[0]) / std[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert_equal(ours(xn, y), theirs(xn, y).float())


# Every name whose repr equals torchattacks' at the defaults (measured: 34 of the 37 single
# attacks). PGDRS, PGDRSL2 and LGV hold an object or a class (the noise, the attack class)
# whose repr names its module and, for an object, its address: equal but for those (below).
# AutoAttack's differs: fastadv's is the original's (see the migration guide).
REPR_EQUAL_AT_DEFAULTS = [
    "VANILA", "GN", "FGSM", "BIM", "RFGSM", "PGD", "EOTPGD", "FFGSM", "TPGD", "MIFGSM", "UPGD", "APGD", "APGDT",
    "DIFGSM", "TIFGSM", "Jitter", "NIFGSM", "SINIFGSM", "VMIFGSM", "VNIFGSM", "SPSA", "JSMA", "EADL1", "EADEN",
    "PIFGSM", "PIFGSMPP", "CW", "PGDL2", "DeepFool", "SparseFool", "OnePixel", "Pixle", "FAB", "Square",
]
REPR_EQUAL_BUT_MODULE_PATHS = ["PGDRS", "PGDRSL2", "LGV"]


def small_rgb_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16 * 16, 10))


@pytest.mark.parametrize("name", REPR_EQUAL_AT_DEFAULTS)
def test_repr_at_defaults_equals_torchattacks(name):
    model = small_rgb_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert repr(getattr(fastadv, name)(model)) == repr(getattr(real_torchattacks, name)(model))


def without_module_paths(text):
    """'<fastadv.attacks.pgdrs.Noise object at 0x7f..>' -> '<Noise object>'; the same for
    torchattacks' paths and for classes ('<class 'BIM'>')."""
    text = re.sub(r" object at 0x[0-9a-f]+>", " object>", text)
    return re.sub(r"\b(?:fastadv|torchattacks)(?:\.\w+)*\.(\w+)", r"\1", text)


@pytest.mark.parametrize("name", REPR_EQUAL_BUT_MODULE_PATHS)
def test_repr_at_defaults_equals_torchattacks_but_module_paths(name):
    model = small_rgb_model()
    args = (torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2, 3, 16, 16))),) \
        if name == "LGV" else ()
    ours, theirs = repr(getattr(fastadv, name)(model, *args)), repr(getattr(real_torchattacks, name)(model, *args))
    assert ours != theirs and "fastadv." in ours
    assert without_module_paths(ours) == without_module_paths(theirs)


def test_constructor_signatures_equal_torchattacks():
    """Every name's positional parameters and defaults are torchattacks' (classes by name:
    LGV's attack_class=BIM); fastadv adds only keyword-only options and **engine. AutoAttack's
    seed defaults to 0, the original's (torchattacks: None, the clock)."""
    def positional(cls):
        return [(p.name, p.default.__name__ if isinstance(p.default, type) else p.default)
                for p in inspect.signature(cls.__init__).parameters.values()
                if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]

    for name in real_torchattacks.__all__:
        ours, theirs = positional(getattr(fastadv, name)), positional(getattr(real_torchattacks, name))
        if name == "AutoAttack":
            assert ours == [(k, 0 if k == "seed" else v) for k, v in theirs]
        else:
            assert ours == theirs, name
    assert inspect.signature(fastadv.LGV).parameters["attack_class"].default is fastadv.BIM


def test_spsa_loss_fn_can_be_replaced_as_in_torchattacks(trained_models, batch):
    x, y = batch[0][:8], batch[1][:8]
    outputs = {}
    for lib in (real_torchattacks, fastadv):
        for replaced in (False, True):
            atk = lib.SPSA(trained_models["mlp"], nb_sample=16, max_batch_size=8)
            if replaced:
                atk.loss_fn = nn.CrossEntropyLoss(reduction="none")
            torch.manual_seed(3)
            outputs[lib.__name__, replaced] = atk(x, y)
    assert_equal(outputs["fastadv", True], outputs["torchattacks", True], "SPSA with cross-entropy")
    assert_equal(outputs["fastadv", False], outputs["torchattacks", False], "SPSA with the margin")
    assert not torch.equal(outputs["fastadv", True], outputs["fastadv", False]), "the replaced loss was not used"
