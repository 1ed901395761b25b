"""Data sets, models and checkpoints for the command line, with clear errors.

Data (``load_data``):
- ``digits``: scikit-learn's bundled 8x8 digits (fastadv.data.load_digits), its
  fixed train or test split;
- a folder of images in class sub-folders (``root/<class>/<image>``, classes in
  sorted order -> labels 0..K-1), read with Pillow (which matplotlib requires, so
  it is there wherever matplotlib is); all images must have the same size;
  grayscale stays 1 channel, anything else becomes RGB;
- a ``.npz`` or ``.pt`` file holding images and labels (keys ``x``/``images`` and
  ``y``/``labels``, or a (images, labels) tuple for .pt); uint8 images are divided
  by 255, float images must lie in [0, 1]; [N, H, W] gets a channel axis and
  channels-last [N, H, W, C] (C in 1, 3, 4) is moved to [N, C, H, W].

Models (``build_model``): the default is fastadv.models:SmallCNN sized from the data;
``package.module:factory`` is any importable callable returning an nn.Module,
called with the keyword arguments given as JSON.
"""
import importlib
import json
import os

import numpy as np
import torch
import torch.nn as nn

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_MODEL = "fastadv.models:SmallCNN"
CHECKPOINT_FORMAT = "fastadv-checkpoint"


class DataError(ValueError):
    """Data that cannot be used: missing, empty, unreadable, inconsistent."""


class ModelError(ValueError):
    """A model that cannot be built, or a checkpoint that does not fit it."""


# -- data ---------------------------------------------------------------------------------

def load_data(spec: str, split: str = "test", limit: int = None):
    """(x float32 [N, C, H, W] in [0, 1], y long [N], class names or None) for a data spec."""
    if spec == "digits":
        from fastadv.data import load_digits

        if split not in ("train", "test"):
            raise DataError(f"digits has the splits 'train' and 'test', got {split!r}")
        train, test = load_digits(seed=0)
        x, y = train if split == "train" else test
        classes = [str(i) for i in range(10)]
    elif os.path.isdir(spec):
        x, y, classes = _load_folder(spec)
    elif os.path.isfile(spec):
        x, y = _load_array_file(spec)
        classes = None
    else:
        raise DataError(f"data {spec!r} is neither 'digits' nor an existing folder or .npz/.pt file")
    if limit is not None:
        if limit < 1:
            raise DataError(f"--limit must be >= 1, got {limit}")
        x, y = x[:limit], y[:limit]
    return x.contiguous(), y, classes


def _read_image(path):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(im, dtype=np.float32) / 65535.0
        if im.mode == "F":
            return np.asarray(im, dtype=np.float32)
        gray = im.mode in ("1", "L", "LA", "I")  # palette, RGB(A), CMYK, ...: 3 channels
        return np.asarray(im.convert("L" if gray else "RGB"), dtype=np.float32) / 255.0


def _load_folder(root):
    try:
        import PIL  # noqa: F401
    except ImportError:  # matplotlib.image needs Pillow too (matplotlib >= 3.3), so no fallback
        raise DataError("reading a folder of images needs Pillow: pip install pillow") from None
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise DataError(f"data folder {root} has no class sub-folders (expected {root}/<class>/<image>.png)")
    images, labels, shape = [], [], None
    for label, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        files = sorted(f for f in os.listdir(folder) if not f.startswith("."))
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                continue
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                raise DataError(f"{path} is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
            try:
                a = _read_image(path)
            except Exception as e:
                raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
            if a.ndim == 3 and a.shape[2] == 4:
                a = a[:, :, :3]
            a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
            if shape is None:
                shape = a.shape
            elif a.shape != shape:
                raise DataError(f"image {path} has shape {a.shape} (C, H, W), the first image had {shape}: "
                                "all images must have the same size and channels")
            images.append(a)
            labels.append(label)
    if not images:
        raise DataError(f"data folder {root} has class sub-folders ({', '.join(classes)}) but no images")
    x = torch.from_numpy(np.stack(images)).float().clamp_(0, 1)
    return x, torch.tensor(labels, dtype=torch.long), classes


def _pick(d, keys, path, what):
    for k in keys:
        if k in d:
            return d[k]
    raise DataError(f"{path} has no {what} (looked for keys {keys}; found {sorted(d)})")


def _load_array_file(path):
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as f:
                d = {k: f[k] for k in f.files}
        elif path.endswith((".pt", ".pth")):
            d = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(d, (tuple, list)) and len(d) == 2:
                d = {"x": d[0], "y": d[1]}
        else:
            raise DataError(f"data file {path} must be .npz or .pt (or a folder of images)")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read data file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path} must hold a dict with images and labels, got {type(d).__name__}")
    x = torch.as_tensor(np.asarray(_pick(d, ("x", "images", "data"), path, "images")))
    y = torch.as_tensor(np.asarray(_pick(d, ("y", "labels", "targets"), path, "labels")))
    return _normalize_images(x, path), _normalize_labels(y, len(x), path)


def _normalize_images(x, path):
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.is_floating_point():
        x = x.float()
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise DataError(f"images in {path} must be uint8 or floats in [0, 1], got values in "
                            f"[{x.min().item():.4g}, {x.max().item():.4g}]")
    else:
        raise DataError(f"images in {path} must be uint8 or float, got {x.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)[:, :3]
    if x.dim() != 4:
        raise DataError(f"images in {path} must have shape [N, C, H, W], [N, H, W, C] or [N, H, W], got {tuple(x.shape)}")
    if len(x) == 0:
        raise DataError(f"{path} holds no images")
    return x.contiguous()


def _normalize_labels(y, n, path):
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        if y.is_floating_point() and torch.equal(y, y.round()):
            y = y.long()
        else:
            raise DataError(f"labels in {path} must be integers, got {y.dtype}")
    y = y.long().reshape(-1)
    if len(y) != n:
        raise DataError(f"{path} has {n} images but {len(y)} labels")
    if y.numel() and y.min() < 0:
        raise DataError(f"labels in {path} must be >= 0, got {y.min().item()}")
    return y


# -- models and checkpoints ---------------------------------------------------------------

def default_model_args(x, y):
    if x.shape[2] != x.shape[3]:
        raise ModelError(f"the default model SmallCNN needs square images, got {x.shape[2]}x{x.shape[3]}; "
                         "pass --model package.module:factory")
    return {"in_channels": int(x.shape[1]), "n_classes": max(int(y.max()) + 1, 2), "image_size": int(x.shape[2])}


def parse_model_args(text):
    if text is None:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelError(f"--model-args must be a JSON object, e.g. '{{\"width\": 32}}': {e}") from None
    if not isinstance(args, dict):
        raise ModelError(f"--model-args must be a JSON object, got {type(args).__name__}")
    return args


def build_model(spec: str, kwargs: dict) -> nn.Module:
    if ":" not in spec:
        raise ModelError(f"--model must look like package.module:factory, got {spec!r}")
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"cannot import {module_name!r} for --model {spec}: {e}") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"{module_name} has no attribute {attr!r} (--model {spec})")
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise ModelError(f"calling {spec}(**{kwargs}) failed: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def read_checkpoint(path):
    """(state_dict, metadata dict) from a fastadv checkpoint or a plain state dict."""
    if not os.path.isfile(path):
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"cannot read checkpoint {path} (corrupt, truncated, or not a state dict saved with "
                         f"torch.save(model.state_dict(), ...)): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], {}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise ModelError(f"checkpoint {path} holds no state dict (a dict of tensors)")


def load_weights(model, state_dict, path, spec):
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        detail = str(e).replace("Error(s) in loading state_dict for", "loading state dict into")
        raise ModelError(f"checkpoint {path} does not match the model {spec}: {detail}") from None


def write_checkpoint(path, model, *, model_spec, model_args, **meta):
    from fastadv.evaluate import atomic_save

    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"format": CHECKPOINT_FORMAT, "model": model_spec, "model_args": model_args,
                 "state_dict": state_dict, **meta}, path)
