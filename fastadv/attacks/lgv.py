"""LGV (Gubri et al., 2022): attack a collection of model copies gathered along an SGD trajectory."""
import copy
import itertools
import numbers
import os
import random
from typing import Any, Type

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from fastadv.attack import Attack
from fastadv.attacks.bim import BIM
from fastadv.attacks.onepixel import check_count
from fastadv.hints import Model
from fastadv.validation import check_budget

ORDERS = ("shuffle", "random", None)


def check_lgv_args(trainloader, lr, epochs, nb_models_epoch, wd, n_grad, attack_class):
    if trainloader is not None and not (hasattr(trainloader, "__iter__") and hasattr(trainloader, "__len__")):
        raise TypeError(f"trainloader must be a DataLoader (iterable with a length) of (images, labels), "
                        f"got {type(trainloader).__name__}")
    if isinstance(n_grad, bool) or not isinstance(n_grad, numbers.Integral) or not (n_grad > 0 or n_grad == -1):
        raise ValueError(f"n_grad must be an int > 0, or -1 for every model, got {n_grad!r}")
    if not (isinstance(attack_class, type) and issubclass(attack_class, Attack)):
        raise TypeError(f"attack_class must be a fastadv attack class (e.g. fastadv.BIM), got {attack_class!r}")
    return (check_budget(lr, "lr"), check_count(epochs, "epochs"), check_count(nb_models_epoch, "nb_models_epoch"),
            check_budget(wd, "wd"), int(n_grad))


def progress(iterable, description, verbose):
    """tqdm's progress bar when verbose and tqdm is installed, as the reference."""
    if not verbose:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, description)


def collect_models(model, trainloader, *, logits, lr, epochs, nb_models_epoch, wd, device, verbose=False):
    """Train model in place with SGD (momentum 0.9, constant lr, weight decay wd) on
    epochs * nb_models_epoch slices of len(trainloader) / nb_models_epoch batches (each
    slice from a fresh iterator over trainloader, as the reference) and return a copy
    of the model after each slice. logits(inputs) runs the model (with normalization).
    The copies and the model are left in the mode the model had.
    """
    given_training = model.training
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    loss_fn = nn.CrossEntropyLoss()
    n_batches = int(len(trainloader) * (1.0 / nb_models_epoch))
    models = []
    with torch.enable_grad():
        for _ in progress(range(epochs * nb_models_epoch), "Collecting models", verbose):
            for inputs, targets in itertools.islice(trainloader, n_batches):
                loss = loss_fn(logits(inputs.to(device)), targets.to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            sample = copy.deepcopy(model)
            if not given_training:
                sample.eval()
            models.append(sample)
    if not given_training:
        model.eval()
    return models


class LightEnsemble(nn.Module):
    """A collection of models answering one forward with n_grad of them (the mean of
    their logits), chosen per forward: cycling through the list ('shuffle', after one
    random.shuffle of it in place, or None: in the given order), or drawn with
    random.sample ('random'). n_grad -1 (or >= the number of models): all of them."""

    def __init__(self, list_models, order="shuffle", n_grad=1):
        super().__init__()
        if len(list_models) < 1:
            raise ValueError("LightEnsemble needs at least one model")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if isinstance(n_grad, bool) or not isinstance(n_grad, numbers.Integral) or not (n_grad > 0 or n_grad == -1):
            raise ValueError(f"n_grad must be an int > 0, or -1 for every model, got {n_grad!r}")
        if order == "shuffle":
            random.shuffle(list_models)
        self.models = nn.ModuleList(list_models)
        self.n_models = len(list_models)
        self.order = order
        self.n_grad = n_grad
        self.f_count = 0

    def forward(self, x):
        if self.n_grad >= self.n_models or self.n_grad < 0:
            chosen = range(self.n_models)
        elif self.order == "random":
            chosen = random.sample(range(self.n_models), self.n_grad)
        else:
            chosen = [i % self.n_models for i in range(self.f_count, self.f_count + self.n_grad)]
            self.f_count += self.n_grad
        if self.n_grad == 1:
            return self.models[chosen[0]](x)
        # in list order; each model gets its own copy of x in case it works in place
        return torch.stack([m(x.clone()) for i, m in enumerate(self.models) if i in chosen]).mean(dim=0)


class LGV(Attack):
    r"""LGV from 'LGV: Boosting Adversarial Example Transferability from Large Geometric Vicinity'
    [https://arxiv.org/abs/2207.13129].

    Phase 1 (on the first attack, unless load_models() was called): a copy of the model
    is trained with SGD (constant lr, momentum 0.9, weight decay wd) on trainloader for
    `epochs` epochs, and nb_models_epoch copies of it are collected per epoch. Phase 2:
    attack_class (with **kwargs) attacks a LightEnsemble of the collected models, each
    forward using n_grad of them, cycling through the list after one random.shuffle.
    The caller's model is never trained (LGV works on a deep copy).

    Equivalence: bit-exact with torchattacks 3.5.1 LGV given the same attack class
    (fastadv's for fastadv, torchattacks' for torchattacks), the same torch.manual_seed
    and random.seed (the loader's shuffling and the random start draw from torch's
    generator; the ensemble's shuffle from Python's), untargeted and in random and
    least-likely targeted modes. Differences, all where the reference fails:
      - targeted by label or by function: the reference raises NotImplementedError;
        fastadv passes the mode to the attack.
      - set_mode_default() after a targeted run resets the attack (the reference keeps
        attacking the old targets); load_models() after an attack rebuilds the ensemble.
      - set_normalization_used: the attack inherits it (the reference's attack does not).
      - epochs, nb_models_epoch must be >= 1 (0 leaves no model: the reference fails later).
    Without a trainloader (None), the models must come from load_models(); otherwise
    attacking raises a ValueError naming trainloader.

    Arguments:
        model (nn.Module): initial model (copied, never modified).
        trainloader (DataLoader): (images in [0, 1], labels) batches to train the copies on.
        lr (float): constant learning rate, >= 0. (Default: 0.05)
        epochs (int): training epochs, >= 1. (Default: 10)
        nb_models_epoch (int): models collected per epoch, >= 1. (Default: 4)
        wd (float): SGD weight decay, >= 0. (Default: 1e-4)
        n_grad (int): models per forward, > 0, or -1 for all. (Default: 1)
        verbose (bool): print the phases and a progress bar (tqdm if installed). (Default: True)
        attack_class: a fastadv attack class. (Default: fastadv.BIM, as the reference)
        **kwargs: the attack's arguments (eps, alpha, steps, backend, engine options...).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.LGV(model, trainloader, lr=0.05, epochs=10, nb_models_epoch=4, wd=1e-4,
        ...                      n_grad=1, attack_class=fastadv.BIM, eps=4/255, alpha=4/255/10, steps=50)
        >>> attack.collect_models()
        >>> attack.save_models('./models/lgv/')
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, trainloader: DataLoader, lr: float = 0.05, epochs: int = 10,
                 nb_models_epoch: int = 4, wd: float = 1e-4, n_grad: int = 1, verbose: bool = True,
                 attack_class: Type[Attack] = BIM, **kwargs: Any) -> None:
        lr, epochs, nb_models_epoch, wd, n_grad = check_lgv_args(
            trainloader, lr, epochs, nb_models_epoch, wd, n_grad, attack_class)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (LGV trains a copy of it), got {type(model).__name__}")
        super().__init__("LGV", copy.deepcopy(model))
        # in the reference's order (its repr's order)
        self.trainloader = trainloader
        self.lr, self.epochs, self.nb_models_epoch, self.wd, self.n_grad = lr, epochs, nb_models_epoch, wd, n_grad
        self.order = "shuffle"
        self.attack_class = attack_class
        self.verbose = bool(verbose)
        self.kwargs_att = kwargs
        self.supported_mode = ["default", "targeted"]
        self.list_models = []
        self.base_attack = None  # built on the first attack, after the models are collected
        self._trainable = [p.requires_grad for p in self.model.parameters()]

    def collect_models(self):
        """Collect the models along the SGD trajectory (appended to list_models)."""
        if self.trainloader is None:
            raise ValueError("LGV has no trainloader to collect models from: pass one, or call load_models()")
        frozen = [p.requires_grad for p in self.model.parameters()]
        for p, trainable in zip(self.model.parameters(), self._trainable):
            p.requires_grad_(trainable)  # the attack's model guard freezes them
        try:
            self.list_models += collect_models(
                self.model, self.trainloader, logits=self.get_logits, lr=self.lr, epochs=self.epochs,
                nb_models_epoch=self.nb_models_epoch, wd=self.wd, device=self.device, verbose=self.verbose,
            )
        finally:
            for p, flag in zip(self.model.parameters(), frozen):
                p.requires_grad_(flag)

    def load_models(self, list_models):
        """Use these models (a list of nn.Module) instead of collecting them."""
        if not isinstance(list_models, list) or not all(isinstance(m, nn.Module) for m in list_models):
            raise ValueError("list_models should be a list of pytorch models")
        self.list_models = list_models
        self.base_attack = None

    def save_models(self, path):
        """Save the collected models' state dicts to path/lgv_model_00000.pt, ... as the reference."""
        if len(self.list_models) == 0:
            raise RuntimeError("Call collect_models() before saving collected models.")
        os.makedirs(path, exist_ok=True)
        for i, model in enumerate(self.list_models):
            torch.save({"state_dict": model.state_dict()}, os.path.join(path, f"lgv_model_{i:05}.pt"))

    def _build_attack(self):
        self.list_models = [m.to(self.device) for m in self.list_models]
        ensemble = LightEnsemble(self.list_models, order=self.order, n_grad=self.n_grad)
        attack = self.attack_class(model=ensemble.to(self.device), **self.kwargs_att)
        if self.normalization_used is not None:
            attack.set_normalization_used(self.normalization_used["mean"].flatten().tolist(),
                                          self.normalization_used["std"].flatten().tolist())
            attack._set_normalization_applied(self._normalization_applied)
        return attack

    def _set_attack_mode(self):
        atk = self.base_attack
        atk.set_model_training_mode(self._model_training, self._batchnorm_training, self._dropout_training)
        if not self.targeted:
            atk.set_mode_default()
        elif self.attack_mode == "targeted(random)":
            atk.set_mode_targeted_random(quiet=True)
        elif self.attack_mode == "targeted(least-likely)":
            atk.set_mode_targeted_least_likely(kth_min=self._kth_min, quiet=True)
        elif self.attack_mode == "targeted(label)":
            atk.set_mode_targeted_by_label(quiet=True)
        else:
            atk.set_mode_targeted_by_function(self._target_map_function, quiet=True)

    def forward(self, images, labels):
        if len(self.list_models) == 0:
            if self.verbose:
                print(f"Phase 1: collect models for {self.epochs} epochs")
            self.collect_models()
        if self.base_attack is None:
            if self.verbose:
                print(f"Phase 2: craft adversarial examples with {self.attack_class.__name__}")
            self.base_attack = self._build_attack()
        self._set_attack_mode()
        return self.base_attack(images, labels)


def lgv(model: Model, images: torch.Tensor, labels: torch.Tensor, *, trainloader: DataLoader, lr: float = 0.05,
        epochs: int = 10, nb_models_epoch: int = 4, wd: float = 1e-4, n_grad: int = 1, attack_class: Type[Attack] = BIM,
        targeted: bool = False, verbose: bool = False, **kwargs: Any) -> torch.Tensor:
    """LGV in one call: collects the models from trainloader, then attacks (see LGV).

    Every call trains anew; to attack several batches with the same models, use the
    LGV class. targeted: labels are the targets. kwargs go to attack_class.
    """
    atk = LGV(model, trainloader, lr=lr, epochs=epochs, nb_models_epoch=nb_models_epoch, wd=wd, n_grad=n_grad,
              verbose=verbose, attack_class=attack_class, **kwargs)
    if targeted:
        atk.set_mode_targeted_by_label(quiet=True)
    return atk(images, labels)
