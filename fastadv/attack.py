"""Attack: the torchattacks-compatible base class every attack derives from.

It owns what is common to all attacks: the model's mode during the attack (and
restoring it after), input normalization, targeted modes, input validation and
the backend switch. Subclasses implement ``forward(images, labels)`` on inputs
already in [0, 1] space and on the model's device.
"""
import dataclasses
import inspect
import warnings
from typing import Optional

import torch
import torch.nn as nn

from fastadv import backend, saving, validation
from fastadv.engine import EngineOptions, finite_or_clean, model_device, model_guard
from fastadv.hints import EngineKwargs, Unpack
from fastadv.loop import chunked

ENGINE_KEYWORDS = tuple(f.name for f in dataclasses.fields(EngineOptions))


def _propagate(method):
    """Replay a configuration call on every attack nested in this one (MultiAttack)."""

    def wrapper(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        for atk in self._attacks.values():
            getattr(atk, method.__name__)(*args, **kwargs)
        return result

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class Attack:
    """Base class for all attacks; see torchattacks.Attack, whose API this matches.

    Arguments:
        name (str): name of the attack.
        model (nn.Module): model to attack; its device becomes the attack's device.
        backend (str, optional): 'auto', 'triton', 'torch' or 'interpret'
            (default: the FASTADV_BACKEND environment variable, else 'auto').
        **engine: how the attack runs (precision, channels_last, early_stop,
            batch_size, cuda_graph, fast); see fastadv.engine.EngineOptions.
            The defaults are exact mode: the reference's results.
    """

    # True for the attacks that take engine.batch_size themselves and run on fixed-shape slots
    # (fastadv.slots); the others are called chunk by chunk.
    runs_on_slots = False

    def __init__(self, name: str, model: nn.Module, backend: Optional[str] = None,
                 **engine: Unpack[EngineKwargs]) -> None:
        self._check_keywords(engine)
        self.attack = name
        self._attacks = {}
        self.set_model(model)
        self.device = model_device(model, None)
        self.attack_mode = "default"
        self.supported_mode = ["default"]
        self.targeted = False
        self._target_map_function = None
        self.normalization_used = None
        self._normalization_applied = None
        self._return_type = "float"
        if type(model).__name__ == "RobModel":  # MAIR's wrapper carries its normalization, as torchattacks reads it
            self._set_rmodel_normalization_used(model)
        self._model_training = False
        self._batchnorm_training = False
        self._dropout_training = False
        # After the reference's attributes, so that repr lists them in the reference's order.
        self.backend = backend
        self.engine = EngineOptions(**engine)

    def _check_keywords(self, engine):
        """An unknown keyword names the attack and what it accepts (not EngineOptions)."""
        unknown = [k for k in engine if k not in ENGINE_KEYWORDS]
        if not unknown:
            return
        cls = type(self)
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]
        own = [p for p in params if inspect.signature(cls.__init__).parameters[p].kind
               not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        raise TypeError(
            f"{cls.__name__}() got an unexpected keyword argument {unknown[0]!r}; "
            f"it accepts {', '.join(own)} and the engine options {', '.join(ENGINE_KEYWORDS)}"
        )

    def forward(self, images, labels=None, *args, **kwargs):
        raise NotImplementedError

    # -- configuration ---------------------------------------------------------------

    @_propagate
    def set_model(self, model):
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
        self.model = model
        self.model_name = type(model).__name__

    @_propagate
    def set_device(self, device):
        """The device the attack runs on; stored as given, as torchattacks does."""
        self.device = device

    @_propagate
    def set_backend(self, backend):
        """Choose the backend of the step ops: 'auto', 'triton', 'torch' or 'interpret'."""
        self.backend = backend

    @_propagate
    def set_engine(self, **options):
        """Set how the attack runs; see fastadv.engine.EngineOptions (exact mode by default)."""
        self.engine = EngineOptions(**options)

    @_propagate
    def set_normalization_used(self, mean, std):
        """The model expects inputs normalized with (mean, std) per channel.

        Inputs passed to the attack and the adversarial examples it returns are then
        in normalized space; budgets and clipping stay in [0, 1] pixel space.
        """
        n = len(mean)
        if len(std) != n:
            raise ValueError(f"mean and std must have the same length, got {n} and {len(std)}")
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, n, 1, 1)
        if not (std_t > 0).all():
            raise ValueError("std must be > 0 for every channel")
        self.normalization_used = {
            "mean": torch.as_tensor(mean, dtype=torch.float32).reshape(1, n, 1, 1),
            "std": std_t,
        }
        self._set_normalization_applied(True)

    @_propagate
    def _set_rmodel_normalization_used(self, model):
        """MAIR's RobModel: its mean and std, unless they are the identity (0 and 1)."""
        mean, std = getattr(model, "mean", None), getattr(model, "std", None)
        if mean is None or std is None:
            return
        mean = torch.as_tensor(mean, dtype=torch.float32).detach().cpu().flatten()
        std = torch.as_tensor(std, dtype=torch.float32).detach().cpu().flatten()
        if (mean != 0).all() or (std != 1).all():
            self.set_normalization_used(mean.tolist(), std.tolist())

    @_propagate
    def _set_normalization_applied(self, flag):
        self._normalization_applied = flag

    def normalize(self, inputs):
        mean = self.normalization_used["mean"].to(inputs.device)
        std = self.normalization_used["std"].to(inputs.device)
        return (inputs - mean) / std

    def inverse_normalize(self, inputs):
        mean = self.normalization_used["mean"].to(inputs.device)
        std = self.normalization_used["std"].to(inputs.device)
        return inputs * std + mean

    def get_logits(self, inputs, labels=None, *args, **kwargs):
        """The model's logits for inputs in [0, 1] space (normalizing them if needed)."""
        if self._normalization_applied is False:
            inputs = self.normalize(inputs)
        return self.model(inputs)

    @_propagate
    def set_model_training_mode(self, model_training=False, batchnorm_training=False, dropout_training=False):
        """Run the model in train mode during the attack (BatchNorm and Dropout stay in
        eval unless their flags are set). The caller's modes are restored after."""
        self._model_training = model_training
        self._batchnorm_training = batchnorm_training
        self._dropout_training = dropout_training

    # -- names of older torchattacks releases, still in public code ---------------------

    def set_training_mode(self, model_training=False, batchnorm_training=False, dropout_training=False):
        """torchattacks < 3.5's name of set_model_training_mode."""
        warnings.warn("set_training_mode is set_model_training_mode since torchattacks 3.5", DeprecationWarning, 2)
        self.set_model_training_mode(model_training, batchnorm_training, dropout_training)

    def set_mode_targeted(self, target_map_function=None, quiet=True):
        """torchattacks < 3.4: targeted by function, or by the given labels when None."""
        warnings.warn("set_mode_targeted is set_mode_targeted_by_function / _by_label since torchattacks 3.4",
                      DeprecationWarning, 2)
        if target_map_function is None:
            self.set_mode_targeted_by_label(quiet=quiet)
        else:
            self.set_mode_targeted_by_function(target_map_function, quiet=quiet)

    def set_mode_least_likely(self, kth_min=1, quiet=True):
        """torchattacks < 3.4's name of set_mode_targeted_least_likely."""
        warnings.warn("set_mode_least_likely is set_mode_targeted_least_likely since torchattacks 3.4",
                      DeprecationWarning, 2)
        self.set_mode_targeted_least_likely(kth_min, quiet=quiet)

    @_propagate
    def set_return_type(self, type):
        """torchattacks < 3.5: 'int' returns uint8 images, (x * 255) truncated; 'float' (default) as they are."""
        if type not in ("float", "int"):
            raise ValueError(f"{type} is not a valid type. [Options: float, int]")
        warnings.warn("set_return_type was removed in torchattacks 3.5 (use Attack.to_type)", DeprecationWarning, 2)
        self._return_type = type

    # -- targeted modes ------------------------------------------------------------------

    def get_mode(self):
        return self.attack_mode

    @_propagate
    def set_mode_default(self, quiet=True):
        """Untargeted: maximize the loss of the true labels."""
        self.attack_mode = "default"
        self.targeted = False
        self._target_map_function = None
        if not quiet:
            print("Attack mode is changed to 'default.'")

    @_propagate
    def _set_mode_targeted(self, mode, quiet):
        if "targeted" not in self.supported_mode:
            raise ValueError(f"{self.attack} does not support targeted mode (supported: {self.supported_mode})")
        self.targeted = True
        self.attack_mode = mode
        if not quiet:
            print(f"Attack mode is changed to '{mode}'.")

    @_propagate
    def set_mode_targeted_by_function(self, target_map_function, quiet=False):
        """Targets are target_map_function(images, labels)."""
        self._set_mode_targeted("targeted(custom)", quiet)
        self._target_map_function = target_map_function

    @_propagate
    def set_mode_targeted_random(self, quiet=False):
        """Targets drawn uniformly among the other classes (CPU global RNG, as the reference)."""
        self._set_mode_targeted("targeted(random)", quiet)
        self._target_map_function = self.get_random_target_label

    @_propagate
    def set_mode_targeted_least_likely(self, kth_min=1, quiet=False):
        """Target the class with the kth_min-smallest logit among the other classes."""
        if isinstance(kth_min, bool) or not isinstance(kth_min, int) or kth_min < 1:
            raise ValueError(f"kth_min must be an int >= 1, got {kth_min!r}")
        self._set_mode_targeted("targeted(least-likely)", quiet)
        self._kth_min = kth_min
        self._target_map_function = self.get_least_likely_label

    @_propagate
    def set_mode_targeted_by_label(self, quiet=False):
        """The labels passed to the attack are the targets."""
        self._set_mode_targeted("targeted(label)", quiet)
        self._target_map_function = None

    def get_target_label(self, inputs, labels=None):
        if self.attack_mode == "targeted(label)":
            return labels
        if self._target_map_function is None:
            raise ValueError("no target function: call one of the set_mode_targeted_* methods first")
        target = self._target_map_function(inputs, labels)
        validation.check_labels(target, inputs.shape[0], name="target labels")
        return target.to(self.device if self.device is not None else inputs.device)

    @torch.no_grad()
    def get_output_with_eval_nograd(self, inputs):
        with model_guard(self.model):
            return self.get_logits(inputs)

    def _other_class_logits(self, inputs, labels):
        outputs = self.get_output_with_eval_nograd(inputs)
        if labels is None:
            labels = outputs.argmax(1)
        validation.check_logits(outputs, labels, n_classes_min=2)
        return outputs, labels

    def get_least_likely_label(self, inputs, labels=None):
        """kth_min-smallest logit among the classes other than the label."""
        outputs, labels = self._other_class_logits(inputs, labels)
        if self._kth_min > outputs.shape[1] - 1:
            raise ValueError(f"kth_min={self._kth_min} exceeds the {outputs.shape[1] - 1} other classes")
        masked = outputs.float().scatter(1, labels.view(-1, 1), float("inf"))
        return masked.kthvalue(self._kth_min, dim=1).indices.long()

    def get_random_target_label(self, inputs, labels=None):
        """A class other than the label, uniformly, from the CPU RNG as the reference draws it.

        The reference draws torch.rand([1]) once per sample; one torch.rand([N])
        consumes the CPU generator identically.
        """
        outputs, labels = self._other_class_logits(inputs, labels)
        others = outputs.shape[1] - 1
        t = (others * torch.rand([labels.shape[0]])).long().to(labels.device)
        return (t + (t >= labels).long()).long()

    # -- running -------------------------------------------------------------------------

    def _attack_device(self, images):
        return self.device if self.device is not None else images.device

    def __call__(self, inputs, labels=None, *args, **kwargs):
        adv = self._call(inputs, labels, *args, **kwargs)
        return self.to_type(adv, "int") if self._return_type == "int" else adv

    def _call(self, inputs, labels=None, *args, **kwargs):
        # The data checks of the whole call are read in one host sync at its end, and the
        # backend's environment variable once (not on every step).
        with validation.deferred(), backend.pinned():
            return self._checked_call(inputs, labels, *args, **kwargs)

    def _checked_call(self, inputs, labels, *args, **kwargs):
        # Normalized inputs are range-checked after inverse normalization, below.
        validation.check_images(inputs, check_range=self._normalization_applied is not True)
        if labels is not None or self._needs_labels():
            validation.check_labels(labels, inputs.shape[0])
        guard = model_guard(
            self.model,
            model_training=self._model_training,
            batchnorm_training=self._batchnorm_training,
            dropout_training=self._dropout_training,
        )
        if inputs.shape[0] == 0:
            return inputs.detach().clone().to(self._attack_device(inputs))

        def run(x):
            adv = chunked(lambda xc, yc: self.forward(xc, yc, *args, **kwargs), x, labels,
                          None if self.runs_on_slots else self.engine.batch_size)
            return finite_or_clean(adv, x.to(adv.device)) if isinstance(adv, torch.Tensor) else adv

        with guard:
            if self._normalization_applied is True:
                x = self.inverse_normalize(inputs)
                validation.check_images(x, name="images (after inverse normalization)")
                self._set_normalization_applied(False)
                try:
                    adv = run(x)
                finally:
                    self._set_normalization_applied(True)
                return self.normalize(adv)
            return run(inputs)

    def _needs_labels(self):
        return True

    def _prepare(self, images, labels, copy_images=True):
        """The inputs on the attack's device, copied (the caller's tensors stay untouched).

        copy_images=False, for attacks whose loop never writes into its images: images already on
        the device are not copied (detached, they share the caller's storage, read only).
        """
        device = self._attack_device(images)
        images = images.detach().to(device, copy=copy_images)
        labels = labels.detach().to(device, copy=True) if labels is not None else None
        return images, labels

    def _targets(self, images, labels):
        """The labels the loss uses: the true ones, or the targets in targeted mode."""
        return self.get_target_label(images, labels) if self.targeted else labels

    # -- saving adversarial data sets (torchattacks' save / load) ----------------------

    def save(self, data_loader, save_path=None, verbose=True, return_verbose=False, save_predictions=False,
             save_clean_inputs=False, save_type="float"):
        """Attack every batch of data_loader; save the results as torchattacks does; see fastadv.saving.save."""
        return saving.save(self, data_loader, save_path, verbose=verbose, return_verbose=return_verbose,
                           save_predictions=save_predictions, save_clean_inputs=save_clean_inputs,
                           save_type=save_type)

    load = staticmethod(saving.load)
    to_type = staticmethod(saving.to_type)

    def __repr__(self):
        """torchattacks' repr: the public attributes in the order the constructor sets them.

        fastadv's own options (backend, engine, keyword-only constructor arguments such as
        CW's margin) follow, and only where they differ from their defaults, so the same
        arguments give the same text as torchattacks.
        """
        params = inspect.signature(type(self).__init__).parameters
        own = {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        info, extra = {}, {}
        for k, v in self.__dict__.items():
            if k.startswith("_") or k in ("model", "attack", "supported_mode", "backend", "engine"):
                continue
            if k in own:
                if v != own[k]:
                    extra[k] = v
                continue
            info[k] = v
        info["attack_mode"] = self.attack_mode
        info["normalization_used"] = self.normalization_used is not None
        info.update(extra)
        if self.backend is not None:
            info["backend"] = self.backend
        if self.engine != EngineOptions():
            info["engine"] = self.engine
        return f"{self.attack}({', '.join(f'{k}={v}' for k, v in info.items())})"

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        attacks = self.__dict__.get("_attacks")
        if attacks is None or name == "_attacks":
            return
        for i, atk in enumerate(_nested_attacks(value)):
            attacks[f"{name}.{i}"] = atk


def _nested_attacks(value, seen=None):
    """Attacks held in value, directly or inside lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, Attack):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _nested_attacks(v, seen)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _nested_attacks(v, seen)
