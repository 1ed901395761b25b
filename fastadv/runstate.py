"""The machinery that evaluation and training share: state files, fingerprints,
progress bars and the torch.distributed helpers.

evaluate.py and train.py both build on this module and on nothing of each other.

- State files are written atomically (temporary file, fsync, os.replace), read with
  ``weights_only`` (no code runs) and checked for their format tag and version.
- Fingerprints are SHA-256 digests of tensors, model weights, data and nested
  descriptions; a run's description hashes to the fingerprint its state file carries.
- Distributed helpers: rank and world size, the device collectives run on, and the
  module an attack runs on inside a DistributedDataParallel wrapper.
"""
import hashlib
import json
import os
import sys

import torch
import torch.nn as nn


class StateFileError(ValueError):
    """A state file that belongs to another run, or is corrupt or truncated."""


# -- fingerprints ---------------------------------------------------------------------------

def tensor_digest(h, t: torch.Tensor):
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        tensor_digest(h, t)
    return h.hexdigest()


def data_digest(x, y) -> str:
    h = hashlib.sha256()
    tensor_digest(h, x)
    tensor_digest(h, y)
    return h.hexdigest()


def structure_digest(h, obj):
    """Feed a nested structure of tensors, dicts, lists and scalars into the hash h."""
    if isinstance(obj, torch.Tensor):
        h.update(b"T")
        tensor_digest(h, obj)
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            structure_digest(h, k)
            structure_digest(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            structure_digest(h, v)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def description_fingerprint(description: dict) -> str:
    """The SHA-256 of a JSON-able description (keys sorted)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


# -- state files ------------------------------------------------------------------------------

def atomic_save(obj, path):
    """torch.save to path.partial, fsync, then os.replace: path holds the old or the new
    content, never a partial one."""
    path = os.fspath(path)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text, path):
    path = os.fspath(path)
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_state_file(path, fmt: str, version: int, what: str, error=None):
    """A state file's dict, loaded with weights_only (no code runs) and checked for its
    format tag and version; returns (state, hint). Raises error (StateFileError by
    default) and leaves the file as it is otherwise."""
    error = error or StateFileError
    path = os.fspath(path)
    hint = f"delete {path} to start over, or pass another state file"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage, empty file, ...
        raise error(f"{what} {path} is corrupt or truncated and cannot be read "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {hint}") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise error(f"{path} is not a fastadv {what}; {hint}")
    if state.get("version") != version:
        raise error(f"{what} {path} has version {state.get('version')!r}, this fastadv reads {version}; {hint}")
    return state, hint


# -- progress ---------------------------------------------------------------------------------

class _NoBar:
    def update(self, n=1):
        pass

    def set_description(self, desc):
        pass

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def progress_bar(total, enabled=True, **kwargs):
    """A tqdm bar on stderr when enabled (and tqdm is installed), else a silent stand-in."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, file=sys.stderr, dynamic_ncols=True, **kwargs)
        except ImportError:  # pragma: no cover
            pass
    return _NoBar()


# -- distributed ------------------------------------------------------------------------------

def dist_info():
    """(rank, world size): (0, 1) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device(model_dev):
    """Where collectives' tensors live: the model's device under nccl, else the CPU."""
    import torch.distributed as dist

    return model_dev if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_object(obj, src=0):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _is_ddp(model) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def attack_view(model: nn.Module) -> nn.Module:
    """The module an attack runs on: the module inside DistributedDataParallel, so that
    the attack's passes never touch DDP's reducer; otherwise the model itself (a
    torch.compile'd model stays compiled, unless it compiles a DDP wrapper)."""
    if _is_ddp(model):
        return model.module
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    if inner is not None and _is_ddp(inner):
        return inner.module
    return model
