"""torchattacks' Attack.save / Attack.load: adversarial data sets written to and read from a file.

The file holds what torchattacks 3.5.1 writes: a dict with ``adv_inputs``, ``labels``,
optionally ``preds`` and ``clean_inputs`` (in [0, 1] space: inverse-normalized when the
attack uses normalization; uint8 when ``save_type='int'``) and ``save_type``.
"""
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

SAVE_TYPES = ("float", "int")


def to_type(inputs, type):
    """'int': float32 images as uint8 ((x * 255) truncated); 'float': uint8 images as x / 255."""
    if type == "int":
        return (inputs * 255).type(torch.uint8) if inputs.dtype == torch.float32 else inputs
    if type == "float":
        return inputs.float() / 255 if inputs.dtype == torch.uint8 else inputs
    raise ValueError(f"{type} is not a valid type. [Options: float, int]")


def _print_progress(progress, rob_acc, l2, elapsed, end):
    print("- Save progress: %2.2f %% / Robust accuracy: %2.2f %% / L2: %1.5f (%2.3f it/s) \t"
          % (progress, rob_acc, l2, elapsed), end=end)


def save(atk, data_loader, save_path=None, *, verbose=True, return_verbose=False, save_predictions=False,
         save_clean_inputs=False, save_type="float"):
    """Attack every (images, labels) batch of data_loader with atk.

    verbose prints the running robust accuracy, the mean L2 distance of the fooled samples
    and the batch's time, as torchattacks does; return_verbose returns (robust accuracy in
    %, mean L2, last batch's seconds). With save_path, the file torchattacks writes is
    written once, after the last batch (torchattacks rewrites it after every batch).
    save_predictions needs no verbose here (torchattacks fails without it).
    """
    if save_type not in SAVE_TYPES:
        raise ValueError(f"save_type must be one of {SAVE_TYPES}, got {save_type!r}")
    total_batches = len(data_loader)
    if total_batches == 0:
        raise ValueError("data_loader yields no batch")
    keep = {"adv_inputs": [], "labels": [], "preds": [], "clean_inputs": []}
    correct = total = 0
    l2_distances = []
    rob_acc = l2 = elapsed = 0.0
    for step, (inputs, labels) in enumerate(data_loader):
        start = time.time()
        adv = atk(inputs, labels)
        measure = verbose or return_verbose or save_predictions
        if measure:
            with torch.no_grad():
                pred = atk.get_output_with_eval_nograd(adv).argmax(1)
                right = pred == labels.to(pred.device)
                total += labels.shape[0]
                correct += int(right.sum())
                rob_acc = 100 * correct / total
                delta = (adv - inputs.to(adv.device)).reshape(inputs.shape[0], -1)
                l2_distances.append(torch.norm(delta[~right], p=2, dim=1))
                l2 = torch.cat(l2_distances).mean().item()
                elapsed = time.time() - start
                if verbose:
                    _print_progress((step + 1) / total_batches * 100, rob_acc, l2, elapsed, end="\r")
        if save_path is not None:
            keep["adv_inputs"].append(adv.detach().cpu())
            keep["labels"].append(labels.detach().cpu())
            if save_predictions:
                keep["preds"].append(pred.detach().cpu())
            if save_clean_inputs:
                keep["clean_inputs"].append(inputs.detach().cpu())
    if verbose:
        _print_progress(100.0, rob_acc, l2, elapsed, end="\n")
    if save_path is not None:
        torch.save(_save_dict(atk, keep, save_type), save_path)
    if return_verbose:
        return rob_acc, l2, elapsed


def _save_dict(atk, keep, save_type):
    out = {k: torch.cat(v, 0) for k, v in keep.items() if v}
    for key in ("adv_inputs", "clean_inputs"):
        if key in out:
            if atk.normalization_used is not None:
                out[key] = atk.inverse_normalize(out[key])
            if save_type == "int":
                out[key] = to_type(out[key], "int")
    out["save_type"] = save_type
    return out


def load(load_path, batch_size=128, shuffle=False, normalize=None, load_predictions=False, load_clean_inputs=False):
    """A DataLoader over a file written by save (or by torchattacks' save).

    Batches are [adv_inputs, labels, (preds), (clean_inputs)]; uint8 images come back as
    x / 255; normalize={'mean': [...], 'std': [...]} normalizes the images.
    """
    saved = torch.load(load_path, weights_only=True)
    if not isinstance(saved, dict) or "adv_inputs" not in saved or "save_type" not in saved:
        raise ValueError(f"{load_path} is not a file written by Attack.save")
    keys = ["adv_inputs", "labels"] + (["preds"] if load_predictions else []) + (["clean_inputs"] if load_clean_inputs else [])
    missing = [k for k in keys if k not in saved]
    if missing:
        raise ValueError(f"{load_path} has no {', '.join(missing)} (save it with save_predictions / save_clean_inputs)")
    images = [k for k in ("adv_inputs", "clean_inputs") if k in keys]
    for key in images:
        if saved["save_type"] == "int":
            saved[key] = saved[key].float() / 255
        if normalize is not None:
            n = len(normalize["mean"])
            mean = torch.tensor(normalize["mean"]).reshape(1, n, 1, 1)
            std = torch.tensor(normalize["std"]).reshape(1, n, 1, 1)
            saved[key] = (saved[key] - mean) / std
    print("Data is loaded in the following order: [%s]" % (", ".join(keys)))
    return DataLoader(TensorDataset(*[saved[k] for k in keys]), batch_size=batch_size, shuffle=shuffle)
