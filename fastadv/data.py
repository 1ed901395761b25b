"""Data as PyTorch users hold it, read in index batches by fit and evaluate.

``as_source(data)`` takes an ``(images, labels)`` pair of tensors, a map-style
``Dataset`` (items ``(image, label)``) or a ``DataLoader`` over one, and returns a
``DataSource``: its length, the digest that identifies the data in a run's
fingerprint, and ``batches(index_lists)``, which reads exactly the given samples.
fit and evaluate decide which indices each step reads (seeded, sharded over the
ranks, resumable mid-epoch), so a DataLoader contributes its dataset and its
loading options (workers, collate_fn, pin_memory, ...), not its sampler or order.

Identity, for resuming: the digest of an ``(images, labels)`` pair and of a
``TensorDataset`` is the digest of the tensors; a dataset with a ``fingerprint()``
method (fastadv's folder, CIFAR and memory-map data sets: paths, sizes and
modification times) gives its own; any other dataset is read once in batches and
hashed as it streams by, which yields the digest of the same data as tensors.

Also here: scikit-learn's bundled handwritten digits (``load_digits``, no download).
"""
import hashlib

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from fastadv.runstate import data_digest, tensor_digest


class DataError(ValueError):
    """Data that cannot be used: missing, empty, unreadable, inconsistent, out of range."""


def load_digits(seed: int = 0, test_fraction: float = 0.25):
    """8x8 digits as ((x_train, y_train), (x_test, y_test)); x in [0, 1], shape [N, 1, 8, 8].

    The split is a fixed permutation drawn from a private generator seeded with seed.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


# -- the argument forms of fit and evaluate -----------------------------------------------------

def split_data_args(data, rest, what):
    """(data, rest) for f(model, data, *rest), also for the tensor form f(model, x, y, *rest)
    (and f(model, data, None, *rest) from callers written for that form)."""
    if not isinstance(data, torch.Tensor) and rest and rest[0] is None:
        return data, tuple(rest[1:])
    if isinstance(data, torch.Tensor):
        if not rest or not isinstance(rest[0], torch.Tensor):
            raise TypeError(f"{what}: images given as a tensor need their labels: pass (images, labels) or x, y")
        return (data, rest[0]), tuple(rest[1:])
    return data, tuple(rest)


# -- sources -------------------------------------------------------------------------------------

class TensorSource:
    """Samples of an (images, labels) pair in memory: a batch is x[idx], y[idx]."""

    streamed = False
    batch_size = None

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def identity(self, read=True) -> str:
        return data_digest(self.x, self.y)

    def batches(self, index_lists, progress=None):
        for idx in index_lists:
            yield self.x[idx], self.y[idx]


class DatasetSource:
    """Samples of a map-style Dataset, read by a DataLoader over the given index lists
    (in its workers when num_workers > 0)."""

    streamed = True

    def __init__(self, dataset, loader_options=None, batch_size=None):
        self.dataset, self.batch_size = dataset, batch_size
        self.options = dict(loader_options or {})
        collate = getattr(dataset, "collate", None)
        if callable(collate) and "collate_fn" not in self.options:
            self.options["collate_fn"] = collate

    def __len__(self):
        return len(self.dataset)

    def identity(self, read=True) -> str:
        """The data's digest; a dataset known only by its items is read whole for it,
        unless read is False (no state file to check: the digest is not needed)."""
        own = getattr(self.dataset, "fingerprint", None)
        if callable(own):
            return str(own())
        if isinstance(self.dataset, TensorDataset) and len(self.dataset.tensors) == 2:
            return data_digest(*self.dataset.tensors)
        if not read:
            return f"not read: {type(self.dataset).__name__} of {len(self)} samples"
        return self._streamed_digest()

    def _streamed_digest(self) -> str:
        """data_digest of the whole data set as tensors, computed one batch at a time."""
        n = len(self)
        h, labels, head = hashlib.sha256(), [], None
        for x, y in self.batches(torch.arange(n).split(256)):
            x = x.detach().cpu().contiguous()
            if head is None:
                head = (x.dtype, tuple(x.shape[1:]))
                h.update(f"{x.dtype}{(n, *head[1])}".encode())
            elif (x.dtype, tuple(x.shape[1:])) != head:
                raise DataError(f"the data set's images change dtype or shape: {head} then {(x.dtype, tuple(x.shape[1:]))}")
            h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
            labels.append(torch.as_tensor(y).cpu())
        tensor_digest(h, torch.cat(labels))
        return h.hexdigest()

    def batches(self, index_lists, progress=None):
        index_lists = [idx.tolist() if isinstance(idx, torch.Tensor) else list(map(int, idx)) for idx in index_lists]
        if not index_lists:
            return
        options = dict(self.options)
        if options.get("generator") is None:  # else each iterator draws its workers' seed from the global RNG
            options["generator"] = torch.Generator().manual_seed(0)
        loader = DataLoader(self.dataset, batch_sampler=index_lists, **options)
        for batch in loader:
            if isinstance(batch, BaseException):  # a fastadv data set's collate reports bad samples this way
                raise batch
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise DataError(f"the data set must yield (image, label) pairs, its batches are {type(batch).__name__}")
            yield batch[0], torch.as_tensor(batch[1])


_LOADER_OPTIONS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                   "generator", "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order")


def as_source(data, what="data"):
    """A DataSource for an (images, labels) pair, a map-style Dataset or a DataLoader."""
    if isinstance(data, (TensorSource, DatasetSource)):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return TensorSource(*data)
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            raise DataError(f"{what}: a DataLoader over an IterableDataset cannot be sharded or resumed; "
                            "pass a map-style Dataset (with __getitem__ and __len__)")
        options = {k: getattr(data, k) for k in _LOADER_OPTIONS if hasattr(data, k)}
        if options.get("num_workers", 0) == 0:  # DataLoader refuses these without workers
            for k in ("prefetch_factor", "persistent_workers"):
                options.pop(k, None)
        if options.get("collate_fn") is torch.utils.data.default_collate:
            options.pop("collate_fn")
        return DatasetSource(data.dataset, options, batch_size=data.batch_size)
    if isinstance(data, IterableDataset):
        raise DataError(f"{what}: an IterableDataset cannot be sharded or resumed; pass a map-style Dataset")
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")
                                     and not isinstance(data, (str, bytes, dict, tuple, list, torch.Tensor))):
        return DatasetSource(data)
    raise DataError(f"{what} must be a DataLoader, a map-style Dataset or an (images, labels) pair of tensors, "
                    f"got {type(data).__name__}")


def check_batch(x, y, n_classes, where, error=DataError):
    """Raises error naming the batch (where) if its images are not floats in [0, 1] or
    its labels are not integers in [0, n_classes)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise error(f"{where}: images must be float tensors in [0, 1], got "
                    f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise error(f"{where}: labels must be an integer tensor, got {getattr(y, 'dtype', type(y).__name__)}")
    if y.shape != (len(x),):
        raise error(f"{where}: {len(x)} images but labels of shape {tuple(y.shape)}")
    if x.numel():
        lo, hi = x.min().item(), x.max().item()
        if not (0 <= lo and hi <= 1):  # NaN fails too
            raise error(f"{where}: images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    if n_classes is not None and len(y):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_classes:
            raise error(f"{where}: labels must lie in [0, {n_classes - 1}] for a model with {n_classes} classes, "
                        f"got labels in [{lo}, {hi}]")
