"""Data sets, models and checkpoints for the command line, with clear errors.

Data (``open_data``: a fastadv.data source; ``load_data``: tensors):
- ``digits``: scikit-learn's bundled 8x8 digits (fastadv.data.load_digits), its
  fixed train or test split (in memory);
- a folder of images in class sub-folders (``root/<class>/<image>``, classes in
  sorted order -> labels 0..K-1), streamed: only the file list is in memory and
  images are decoded with Pillow when read, in DataLoader workers; all images must
  have the same size after the optional resize (shorter side) and central crop;
  grayscale stays 1 channel, anything else becomes RGB; unreadable images stop the
  run naming the file, or are skipped (counted) with skip_bad;
- CIFAR-10/100 in its python-pickle layout (only numpy arrays are unpickled); images
  stay uint8 in memory;
- a ``.npy`` file of images (a memory map) with a ``.npy`` file of labels;
- a ``.npz`` or ``.pt`` file holding images and labels (keys ``x``/``images`` and
  ``y``/``labels``, or a (images, labels) tuple for .pt), in memory; uint8 images
  are divided by 255, float images must lie in [0, 1]; [N, H, W] gets a channel
  axis and channels-last [N, H, W, C] (C in 1, 3, 4) is moved to [N, C, H, W].

Models (``build_model``): the default is fastadv.models:SmallCNN sized from the data;
``package.module:factory`` is any importable callable returning an nn.Module,
called with the keyword arguments given as JSON; ``torchvision:NAME``, ``timm:NAME``
and ``robustbench:NAME`` build those packages' models when they are installed, never
downloading weights. ``Normalized`` applies --mean/--std inside the model.
"""
import functools
import hashlib
import importlib
import json
import os
import pickle

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, default_collate

from fastadv.data import DataError, DatasetSource, TensorSource

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_MODEL = "fastadv.models:SmallCNN"
CHECKPOINT_FORMAT = "fastadv-checkpoint"


class ModelError(ValueError):
    """A model that cannot be built, or a checkpoint that does not fit it."""


# -- data ---------------------------------------------------------------------------------

def open_data(spec: str, split: str = "test", limit: int = None, *, labels: str = None, resize: int = None,
              crop: int = None, skip_bad: bool = False, workers: int = 0, log=None):
    """A fastadv.data source for a data spec: tensors for digits, .npz and .pt files;
    a streamed data set (read in `workers` DataLoader worker processes) for folders,
    CIFAR python batches and .npy memory maps. Its ``labels`` (long [N]) are in memory."""
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be >= 1, got {limit}")
    if workers < 0:
        raise DataError(f"--workers must be >= 0, got {workers}")
    if (resize or crop) and not (os.path.isdir(spec) and not _is_cifar(spec)):
        raise DataError("--resize and --crop apply to folders of images only")
    if labels is not None and not spec.endswith(".npy"):
        raise DataError("--labels goes with .npy images only")
    if spec == "digits" or (os.path.isfile(spec) and not spec.endswith(".npy")):
        x, y, _ = load_data(spec, split, limit)
        source = TensorSource(x, y)
        source.labels = y
        return source
    if os.path.isdir(spec) and _is_cifar(spec):
        dataset = CifarDataset(spec, split, limit)
    elif os.path.isdir(spec):
        dataset = FolderDataset(spec, resize=resize, crop=crop, limit=limit, skip_bad=skip_bad, workers=workers, log=log)
    elif spec.endswith(".npy") and os.path.isfile(spec):
        if labels is None:
            raise DataError(f"--data {spec} holds images only: pass their labels with --labels LABELS.npy")
        dataset = NpyDataset(spec, labels, limit)
    else:
        raise DataError(f"data {spec!r} is neither 'digits' nor an existing folder or .npz/.pt/.npy file")
    source = DatasetSource(dataset, {"num_workers": workers})
    source.labels = dataset.labels
    return source


def load_data(spec: str, split: str = "test", limit: int = None):
    """(x float32 [N, C, H, W] in [0, 1], y long [N], class names or None), all in memory."""
    if spec == "digits":
        from fastadv.data import load_digits

        if split not in ("train", "test"):
            raise DataError(f"digits has the splits 'train' and 'test', got {split!r}")
        train, test = load_digits(seed=0)
        x, y = train if split == "train" else test
        classes = [str(i) for i in range(10)]
    elif os.path.isfile(spec):
        x, y = _load_array_file(spec)
        classes = None
    elif os.path.isdir(spec):  # a folder, decoded whole (the command line streams it instead)
        source = open_data(spec, split, limit)
        x, y = next(source.batches([range(len(source))]))
        return x, y, source.dataset.classes
    else:
        raise DataError(f"data {spec!r} is neither 'digits' nor an existing folder or .npz/.pt file")
    if limit is not None:
        if limit < 1:
            raise DataError(f"--limit must be >= 1, got {limit}")
        x, y = x[:limit], y[:limit]
    return x.contiguous(), y, classes


class _Samples(Dataset):
    """Shared parts of fastadv's streamed data sets: labels in memory, a collate that
    reports a bad sample (an exception, raised by the reading process) instead of
    raising inside a worker."""

    classes = None

    def __len__(self):
        return len(self.labels)

    @staticmethod
    def collate(items):
        """default_collate of (image, label) items, or the first bad item's exception.
        In a worker, default_collate stacks straight into shared memory; a batch stacked
        in ordinary memory is moved there when sent, and that grew each worker's memory
        with every batch (about 16 KB per 3x64x64 image, measured)."""
        for item in items:
            if isinstance(item, BaseException):
                return item
        return default_collate(items)

    @staticmethod
    def _image(a):
        """One image array as a float32 tensor: uint8 divided by 255, floats as they are.
        Read batches are converted one image at a time: a batch-sized float temporary,
        freed after each batch, grew each DataLoader worker's heap (measured)."""
        return torch.from_numpy(a).float().div_(255.0) if a.dtype == np.uint8 else torch.from_numpy(a.astype(np.float32))


def _file_digest(h, path, chunk=1 << 22):
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)


# folders of images

def _read_image(path, resize=None, crop=None):
    """[C, H, W] float32 in [0, 1]: grayscale stays 1 channel, anything else becomes RGB;
    resize: the shorter side to this many pixels (bilinear); crop: the central crop x crop."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L"):
            im, divisor = im.convert("I"), 65535.0
        elif im.mode in ("I", "F"):
            divisor = None if im.mode == "F" else 255.0
        else:
            gray = im.mode in ("1", "L", "LA")  # palette, RGB(A), CMYK, ...: 3 channels
            im, divisor = im.convert("L" if gray else "RGB"), 255.0
        if resize:
            w, h = im.size
            s = resize / min(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        if crop:
            w, h = im.size
            if w < crop or h < crop:
                raise DataError(f"image {path} is {w}x{h}, smaller than --crop {crop} (pass --resize too)")
            left, top = (w - crop) // 2, (h - crop) // 2
            im = im.crop((left, top, left + crop, top + crop))
        a = np.asarray(im, dtype=np.float32)
        a = a / divisor if divisor else a  # a division, as x / 255 of uint8 tensors
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a)).clamp_(0, 1)


class FolderDataset(_Samples):
    """root/<class>/<image>: classes in sorted order -> labels 0..K-1. Only the file list
    lives in memory; images are decoded when read (in DataLoader workers)."""

    def __init__(self, root, *, resize=None, crop=None, limit=None, skip_bad=False, workers=0, log=None):
        try:
            import PIL  # noqa: F401
        except ImportError:  # matplotlib.image needs Pillow too (matplotlib >= 3.3), so no fallback
            raise DataError("reading a folder of images needs Pillow: pip install pillow") from None
        for flag, v in (("--resize", resize), ("--crop", crop)):
            if v is not None and v < 1:
                raise DataError(f"{flag} must be >= 1, got {v}")
        self.root, self.resize, self.crop = root, resize, crop
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
        if not self.classes:
            raise DataError(f"data folder {root} has no class sub-folders (expected {root}/<class>/<image>.png)")
        files, labels = [], []
        for label, cls in enumerate(self.classes):
            folder = os.path.join(root, cls)
            for name in sorted(f for f in os.listdir(folder) if not f.startswith(".")):
                path = os.path.join(folder, name)
                if os.path.isdir(path):
                    continue
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    raise DataError(f"{path} is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})")
                files.append(path)
                labels.append(label)
        if not files:
            raise DataError(f"data folder {root} has class sub-folders ({', '.join(self.classes)}) but no images")
        self.files, self.labels, self.skipped = files, torch.tensor(labels, dtype=torch.long), []
        if skip_bad:
            self._drop_unreadable(workers, log)
        if limit is not None:
            self.files, self.labels = self.files[:limit], self.labels[:limit]
        first = self._read(0)
        if isinstance(first, BaseException):
            raise first
        self.shape = tuple(first.shape)

    def _read(self, i):
        path = self.files[i]
        try:
            return _read_image(path, self.resize, self.crop)
        except DataError as e:
            return e
        except Exception as e:
            return DataError(f"cannot read image {path}: {type(e).__name__}: {e}")

    def __getitem__(self, i):
        x = self._read(i)
        if isinstance(x, BaseException):
            return x
        if tuple(x.shape) != self.shape:
            return DataError(f"image {self.files[i]} has shape {tuple(x.shape)} (C, H, W), the first image had "
                             f"{self.shape}: all images must have the same size and channels (--resize/--crop "
                             "make sizes equal)")
        return x, int(self.labels[i])

    def _drop_unreadable(self, workers, log):
        """Decodes every image once (in workers) and keeps the readable ones."""
        self.shape = None
        loader = DataLoader(range(len(self.files)), batch_size=256, num_workers=workers,
                            collate_fn=functools.partial(_unreadable, self), generator=torch.Generator())
        bad = {i for batch in loader for i in batch}
        self.skipped = [self.files[i] for i in sorted(bad)]
        keep = [i for i in range(len(self.files)) if i not in bad]
        self.files, self.labels = [self.files[i] for i in keep], self.labels[keep]
        if log is not None and bad:
            log(f"--skip-bad: skipped {len(bad)} unreadable image(s) of {len(keep) + len(bad)}, "
                f"e.g. {self.skipped[0]}")
        if not self.files:
            raise DataError(f"data folder {self.root} has no readable images")

    def fingerprint(self) -> str:
        """Paths (relative to the root), sizes and modification times, labels and the transforms."""
        h = hashlib.sha256(f"folder/{self.resize}/{self.crop}/{len(self.files)}".encode())
        for path, label in zip(self.files, self.labels.tolist()):
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, self.root)}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
        return h.hexdigest()


def _unreadable(dataset, indices):
    """The indices among these whose image cannot be read (run in a DataLoader worker)."""
    return [i for i in indices if isinstance(dataset._read(i), BaseException)]


# CIFAR-10/100, python version

_CIFAR = {"cifar-10": ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, b"labels"),
          "cifar-100": ({"train": ["train"], "test": ["test"]}, b"fine_labels")}


def _is_cifar(root):
    return any(os.path.exists(os.path.join(root, f)) for f in ("batches.meta", "data_batch_1", "test_batch", "meta"))


class _NumpyOnly(pickle.Unpickler):
    """CIFAR's batches are pickles of dicts of numpy arrays: load those, and nothing else."""

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a CIFAR batch file")


class CifarDataset(_Samples):
    """The python-pickle layout of CIFAR-10 (batches.meta, data_batch_1..5, test_batch)
    or CIFAR-100 (meta, train, test), read directly; images stay uint8 in memory."""

    def __init__(self, root, split, limit=None):
        kind = "cifar-100" if os.path.exists(os.path.join(root, "meta")) else "cifar-10"
        files, label_key = _CIFAR[kind]
        if split not in files:
            raise DataError(f"{kind} has the splits 'train' and 'test', got {split!r}")
        images, labels = [], []
        self.paths = [os.path.join(root, f) for f in files[split]]
        for path in self.paths:
            if not os.path.isfile(path):
                raise DataError(f"{kind} folder {root} lacks the batch file {os.path.basename(path)} "
                                f"(the {split} split needs {', '.join(files[split])})")
            try:
                with open(path, "rb") as f:
                    d = _NumpyOnly(f, encoding="bytes").load()
                data, lab = np.asarray(d[b"data"], dtype=np.uint8), d[label_key]
            except Exception as e:
                raise DataError(f"cannot read CIFAR batch {path}: {type(e).__name__}: {e}") from None
            if data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
                raise DataError(f"CIFAR batch {path} holds data of shape {data.shape} and {len(lab)} labels, "
                                "expected [N, 3072] and N")
            images.append(data)
            labels.extend(lab)
        self.kind, self.split = kind, split
        self.images = np.concatenate(images).reshape(-1, 3, 32, 32)[:limit]
        self.labels = torch.tensor(labels, dtype=torch.long)[:limit]
        meta = os.path.join(root, "batches.meta" if kind == "cifar-10" else "meta")
        self.classes = None
        if os.path.isfile(meta):
            with open(meta, "rb") as f:
                names = _NumpyOnly(f, encoding="bytes").load()
            names = names.get(b"label_names") or names.get(b"fine_label_names")
            self.classes = [n.decode() for n in names] if names else None

    def __getitem__(self, i):
        return self.__getitems__([i])[0][0], int(self.labels[i])

    def __getitems__(self, idx):
        return [(self._image(self.images[i]), self.labels[i]) for i in idx]

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.kind}/{self.split}/{len(self.labels)}".encode())
        for path in self.paths:
            _file_digest(h, path)
        return h.hexdigest()


# .npy memory maps

class NpyDataset(_Samples):
    """Images in a .npy file, opened as a memory map ([N, C, H, W], [N, H, W, C] or
    [N, H, W]; uint8 divided by 255, floats as they are); labels in another .npy file."""

    def __init__(self, images_path, labels_path, limit=None):
        self.path, self.labels_path = images_path, labels_path
        try:
            images = np.load(images_path, mmap_mode="r")
            labels = np.load(labels_path, allow_pickle=False)
        except Exception as e:
            raise DataError(f"cannot read {images_path} or {labels_path}: {type(e).__name__}: {e}") from None
        if images.dtype != np.uint8 and images.dtype.kind != "f":
            raise DataError(f"images in {images_path} must be uint8 or float, got {images.dtype}")
        if images.ndim == 3:
            self.layout = "NHW"
        elif images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
            self.layout = "NHWC"
        elif images.ndim == 4:
            self.layout = "NCHW"
        else:
            raise DataError(f"images in {images_path} must have shape [N, C, H, W], [N, H, W, C] or [N, H, W], "
                            f"got {images.shape}")
        self.labels = _normalize_labels(torch.as_tensor(np.asarray(labels)), len(images), labels_path)[:limit]
        if len(self.labels) == 0:
            raise DataError(f"{images_path} holds no images")
        self._images = None  # opened in each process that reads (a memory map is not pickled to workers)

    def __getstate__(self):
        return {**self.__dict__, "_images": None}

    def __getitem__(self, i):
        return self.__getitems__([i])[0][0], int(self.labels[i])

    def __getitems__(self, idx):
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        items = []
        for a, label in zip(np.asarray(self._images[np.asarray(idx)]), self.labels[idx]):  # one read of the batch
            x = self._image(a)
            if self.layout == "NHW":
                x = x.unsqueeze(0)
            elif self.layout == "NHWC":
                x = x.permute(2, 0, 1)[:3].contiguous()
            items.append((x, label))
        return items

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"npy/{len(self.labels)}".encode())
        _file_digest(h, self.path)
        _file_digest(h, self.labels_path)
        return h.hexdigest()


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

def default_model_args(shape, labels):
    """SmallCNN's arguments for images of shape (C, H, W) and these labels."""
    c, h, w = shape
    if h != w:
        raise ModelError(f"the default model SmallCNN needs square images, got {h}x{w}; "
                         "pass --model package.module:factory (or --resize/--crop)")
    return {"in_channels": int(c), "n_classes": max(int(labels.max()) + 1, 2), "image_size": int(h)}


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


def build_model(spec: str, kwargs: dict, model_dir: str = None) -> nn.Module:
    """The model of a --model spec: torchvision:NAME, timm:NAME, robustbench:NAME (with
    model_dir) or package.module:factory, called with kwargs."""
    if ":" not in spec:
        raise ModelError(f"--model must look like package.module:factory, torchvision:NAME, timm:NAME or "
                         f"robustbench:NAME, got {spec!r}")
    module_name, attr = spec.split(":", 1)
    if module_name in ADAPTERS:
        model = ADAPTERS[module_name](attr, kwargs, model_dir)
    else:
        model = _factory_model(spec, module_name, attr, kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def _factory_model(spec, module_name, attr, kwargs):
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
        return factory(**kwargs)
    except TypeError as e:
        raise ModelError(f"calling {spec}(**{kwargs}) failed: {e}") from None


def _optional(package, spec):
    """An optional package an adapter needs, or ModelError saying how to get it."""
    try:
        return importlib.import_module(package)
    except Exception as e:  # ImportError, or a build that fails to import beside this torch
        raise ModelError(f"--model {spec} needs the package {package.split('.')[0]}, which does not import here "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); install it "
                         f"(pip install {package.split('.')[0]}) next to a matching torch") from None


def _torchvision_model(name, kwargs, model_dir):
    """torchvision.models.get_model(name, weights=None, **kwargs): built untrained, the
    weights come from --checkpoint (nothing is downloaded)."""
    models = _optional("torchvision.models", f"torchvision:{name}")
    if "weights" in kwargs:
        raise ModelError("--model torchvision:NAME builds without weights (nothing is downloaded): "
                         "pass the weights as --checkpoint FILE instead of a 'weights' argument")
    try:
        return models.get_model(name, weights=None, **kwargs)
    except ValueError as e:
        raise ModelError(f"torchvision has no model {name!r} ({e}); e.g. {', '.join(models.list_models()[:8])}, ...") from None
    except TypeError as e:
        raise ModelError(f"torchvision model {name} does not take {sorted(kwargs)}: {e}") from None


def _timm_model(name, kwargs, model_dir):
    """timm.create_model(name, pretrained=False, **kwargs): weights from --checkpoint."""
    timm = _optional("timm", f"timm:{name}")
    if kwargs.get("pretrained"):
        raise ModelError("--model timm:NAME builds without pretrained weights (nothing is downloaded): "
                         "pass the weights as --checkpoint FILE")
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ModelError(f"timm has no model {name!r}: {e}") from None
    except TypeError as e:
        raise ModelError(f"timm model {name} does not take {sorted(kwargs)}: {e}") from None


def robustbench_weights(name, model_dir, dataset="cifar10", threat_model="Linf"):
    """The path robustbench reads a model's weights from: model_dir/dataset/threat_model/name.pt."""
    return os.path.join(model_dir, dataset, threat_model, f"{name}.pt")


def _robustbench_model(name, kwargs, model_dir):
    """robustbench.utils.load_model with weights already in model_dir (robustbench would
    download missing ones: fastadv refuses instead). kwargs: dataset (cifar10), threat_model (Linf)."""
    spec = f"robustbench:{name}"
    if model_dir is None:
        raise ModelError(f"--model {spec} needs --model-dir DIR holding DIR/<dataset>/<threat model>/{name}.pt")
    unknown = set(kwargs) - {"dataset", "threat_model"}
    if unknown:
        raise ModelError(f"--model {spec} takes the model arguments dataset and threat_model, got {sorted(unknown)}")
    dataset, threat_model = kwargs.get("dataset", "cifar10"), kwargs.get("threat_model", "Linf")
    path = robustbench_weights(name, model_dir, dataset, threat_model)
    if not os.path.isfile(path):
        raise ModelError(f"--model {spec}: no weights at {path} (fastadv downloads nothing: put the file there)")
    utils = _optional("robustbench.utils", spec)
    try:
        return utils.load_model(model_name=name, model_dir=model_dir, dataset=dataset, threat_model=threat_model)
    except Exception as e:
        raise ModelError(f"robustbench could not load {name} from {path}: {type(e).__name__}: {e}") from None


ADAPTERS = {"torchvision": _torchvision_model, "timm": _timm_model, "robustbench": _robustbench_model}


class Normalized(nn.Module):
    """model((x - mean) / std) with per-channel mean and std: attacks still see [0, 1]
    images, the model its normalized inputs (mean and std are not in the state dict)."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.dim() != 1 or mean.shape != std.shape or not bool((std > 0).all()):
            raise ModelError(f"--mean and --std need one value per channel each, std > 0; got {mean.tolist()} "
                             f"and {std.tolist()}")
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        if x.shape[1] != self.mean.shape[1]:
            raise ModelError(f"--mean/--std have {self.mean.shape[1]} values, the images {x.shape[1]} channels")
        return self.model((x - self.mean) / self.std)


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
    from fastadv.runstate import atomic_save

    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"format": CHECKPOINT_FORMAT, "model": model_spec, "model_args": model_args,
                 "state_dict": state_dict, **meta}, path)
