"""Pixle (Pomponi et al., 2022): random search that moves patches of pixels elsewhere in the image. L0."""
import functools
import numbers
from typing import Literal, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from fastadv.attack import Attack
from fastadv.attacks.onepixel import check_count, check_model_output, host_array
from fastadv.engine import EXACT, run_functional
from fastadv.hints import EngineKwargs, Model, Unpack

PIXEL_MAPPINGS = ("random", "similarity", "similarity_random", "distance", "distance_random")


def check_dimensions(value, name: str) -> tuple:
    """A patch side range: one value or a (low, high) pair of ints > 0 (pixels) or floats
    in [0, 1] (fractions of the image side)."""
    pair = [value, value] if isinstance(value, numbers.Real) and not isinstance(value, bool) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name} must be a number or a (low, high) pair, got {value!r}")
    for d in pair:
        is_int = isinstance(d, numbers.Integral) and not isinstance(d, bool)
        if not ((is_int and d > 0) or (isinstance(d, float) and 0 <= d <= 1)):
            raise ValueError(f"{name} must hold ints > 0 or floats in [0, 1], got {value!r}")
    if all(isinstance(d, numbers.Integral) for d in pair) and pair[0] > pair[1]:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value!r}")
    return tuple(pair)


def check_pixle_args(x_dimensions, y_dimensions, pixel_mapping, restarts, max_iterations):
    if not isinstance(pixel_mapping, str) or pixel_mapping.lower() not in PIXEL_MAPPINGS:
        raise ValueError(f"pixel_mapping must be one of {PIXEL_MAPPINGS}, got {pixel_mapping!r}")
    return (check_dimensions(x_dimensions, "x_dimensions"), check_dimensions(y_dimensions, "y_dimensions"),
            pixel_mapping.lower(), check_count(restarts, "restarts"), check_count(max_iterations, "max_iterations"))


def side_range(dimensions, side: int, name: str) -> tuple:
    """The patch side's (low, high) in pixels for an image side of `side` pixels."""
    low, high = (max(1, d if isinstance(d, numbers.Integral) else round(side * d)) for d in dimensions)
    if low > high:
        raise ValueError(f"{name}={dimensions} gives a patch side range ({low}, {high}) with low > high on this image")
    return low, high


class PatchSearch:
    """Pixle's random draws and patch moves for one image [1, C, H, W], in the reference's order.

    The reference writes a patch pixel to (row, column) = (its first coordinate, its
    second), which mixes up x and y: on square images that is a transposed draw, kept
    for bit-exactness; on other images it indexes outside the image (IndexError in the
    reference), so there the pixel goes to (row, column) = (y, x), as meant.
    """

    def __init__(self, image, x_bounds, y_bounds, mapping):
        self.image = image
        self.c, self.h, self.w = image.shape[1:]
        self.x_bounds, self.y_bounds, self.mapping = x_bounds, y_bounds, mapping

    def patch(self):
        u, v = np.random.uniform(0, 1, 2)
        x_side = np.random.randint(self.x_bounds[0], self.x_bounds[1] + 1)
        y_side = np.random.randint(self.y_bounds[0], self.y_bounds[1] + 1)
        x, y = int(u * (self.w - 1)), int(v * (self.h - 1))
        return x, y, min(x_side, self.w - x), min(y_side, self.h - y)

    def destinations(self, x, y, x_side, y_side, current):
        """(first, second) destination coordinates of the patch's pixels, in row-major order."""
        if self.mapping == "random":
            d = np.random.uniform(0, 1, (x_side * y_side, 2))  # one (dx, dy) pair per pixel, as the reference
            return (d[:, 0] * (self.w - 1)).astype(np.int64), (d[:, 1] * (self.h - 1)).astype(np.int64)
        rows = torch.arange(y, y + y_side).repeat_interleave(x_side)
        cols = torch.arange(x, x + x_side).repeat(y_side)
        pixels = self.image[0][:, rows, cols].T[:, :, None, None]  # [K, C, 1, 1]
        diff = (current - pixels).abs().mean(1).flatten(1)  # [K, H * W]
        if diff.dtype == torch.bfloat16:  # numpy lacks bf16 (the reference fails), and the weights must sum to 1
            diff = diff.float()
        if "similarity" in self.mapping:
            diff = 1 / (1 + diff)
            diff[diff == 1] = 0
        probs = host_array(torch.softmax(diff, 1))
        own = (rows * self.w + cols).tolist()
        first, second = [], []
        for k, p in enumerate(probs):
            if "random" in self.mapping:
                index = own[k]
                while index == own[k]:
                    index = np.random.choice(len(p), p=p)
            else:
                order = np.argsort(-p, kind="stable")  # sorted(..., reverse=True): ties keep index order
                index = order[1] if order[0] == own[k] else order[0]
            first.append(index % self.w)
            second.append(index // self.w)
        return np.array(first, dtype=np.int64), np.array(second, dtype=np.int64)

    def move(self, x, y, x_side, y_side, first, second, current):
        """current with the patch's pixels written to their destinations."""
        rows, cols = (first, second) if self.h == self.w else (second, first)
        out = current.clone()
        src = self.image[0, :, y:y + y_side, x:x + x_side].reshape(self.c, -1)
        out[0, :, torch.from_numpy(rows).to(out.device), torch.from_numpy(cols).to(out.device)] = src
        return out


def pixle_loop(forward, x, y, *, x_dimensions=(2, 10), y_dimensions=(2, 10), pixel_mapping="random", restarts=20,
               max_iterations=10, update_each_iteration=False, targeted=False, deterministic=True, engine=EXACT):
    """Pixle on inputs the caller owns, one image at a time (the reference's order of numpy
    draws). y: the labels, or the targets when targeted.

    The reference runs the model twice on every candidate (loss, then success test);
    with deterministic (a model whose output depends on its input only) one forward
    answers both. Host syncs: every candidate (the search runs on the host).
    """
    if x.dim() != 4:
        raise ValueError(f"Pixle needs images of shape [N, C, H, W], got shape {tuple(x.shape)}")
    _, _, h, w = x.shape
    x_bounds = side_range(x_dimensions, w, "x_dimensions")
    y_bounds = side_range(y_dimensions, h, "y_dimensions")
    checked = []

    def probabilities(image):
        with torch.no_grad():
            logits = forward(image)
        if not checked:
            check_model_output(logits, y)
            checked.append(True)
        return host_array(torch.softmax(logits, dim=1))[0]

    def evaluate(image, label, success=True):
        """(loss, fooled) of one candidate: the label's probability (1 - the target's)."""
        prob = probabilities(image)
        loss = 1 - prob[label] if targeted else prob[label]
        if not success:
            return loss, None
        if not deterministic:
            prob = probabilities(image)
        pred = np.argmax(prob)
        return loss, (pred == label if targeted else pred != label)

    rounds = 1 if update_each_iteration else restarts
    advs = []
    for i in range(x.shape[0]):
        patches = PatchSearch(x[i:i + 1], x_bounds, y_bounds, pixel_mapping)
        evaluate_image = functools.partial(evaluate, label=int(y[i]))
        advs.append(patch_search(patches, evaluate_image, rounds, max_iterations, greedy=update_each_iteration))
    return torch.cat(advs)


def candidate(patches, current):
    x, y, x_side, y_side = patches.patch()
    first, second = patches.destinations(x, y, x_side, y_side, current)
    return patches.move(x, y, x_side, y_side, first, second, current)


def patch_search(patches, evaluate, rounds, max_iterations, greedy):
    """torchattacks' restart_forward (greedy False): each of `rounds` rounds moves patches
    onto the best image of the rounds before (a round without improvement: onto its
    last candidate); and its iterative_forward (greedy True, one round): every
    improvement becomes the image the next patch moves onto. Returns the first
    candidate that fools the model, else the best image."""
    best_image, best_solution = patches.image.clone(), None
    best_loss, _ = evaluate(patches.image, success=False)
    for _ in range(rounds):
        for _ in range(max_iterations):
            pert = candidate(patches, best_image)
            loss, fooled = evaluate(pert)
            if loss < best_loss:
                best_loss, best_solution = loss, pert
                if greedy:
                    best_image = pert
            if fooled:
                return pert
        if not greedy:
            best_image = pert if best_solution is None else best_solution
    return best_image


def pixle(model: Model, images: torch.Tensor, labels: torch.Tensor, *,
          x_dimensions: Union[float, Tuple[float, float]] = (2, 10),
          y_dimensions: Union[float, Tuple[float, float]] = (2, 10),
          pixel_mapping: Literal["random", "similarity", "similarity_random", "distance", "distance_random"] = "random",
          restarts: int = 20, max_iterations: int = 10, update_each_iteration: bool = False, targeted: bool = False,
          backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> torch.Tensor:
    """Pixle: moves patches of pixels to other places of the image (L0, black-box).

    Arguments:
        model: classifier taking images in [0, 1] and returning logits [N, C].
        images: [N, C, H, W] floats in [0, 1]. labels: [N] class indices (the targets when targeted).
        x_dimensions, y_dimensions, pixel_mapping, restarts, max_iterations, update_each_iteration:
            as Pixle.
        **engine: fastadv.engine.EngineOptions (batch_size chunks the batch).
    Draws from numpy's global RNG. Returns the adversarial images on the model's device;
    bit-exact with torchattacks.Pixle after the same np.random.seed on square images (see Pixle).
    """
    x_dimensions, y_dimensions, pixel_mapping, restarts, max_iterations = check_pixle_args(
        x_dimensions, y_dimensions, pixel_mapping, restarts, max_iterations)
    return run_functional(
        pixle_loop, model, images, labels, engine=engine, x_dimensions=x_dimensions, y_dimensions=y_dimensions,
        pixel_mapping=pixel_mapping, restarts=restarts, max_iterations=max_iterations,
        update_each_iteration=bool(update_each_iteration), targeted=targeted,
    )


class Pixle(Attack):
    r"""Pixle from 'Pixle: a fast and effective black-box attack based on rearranging pixels'
    [https://arxiv.org/abs/2202.02236].

    Distance measure: L0. For each image, each iteration draws a patch (sides within
    x_dimensions / y_dimensions) and moves its pixels to places chosen by pixel_mapping
    ('random'; 'similarity' / 'distance': the most similar / different place;
    '*_random': drawn with those softmax weights); a candidate that lowers the label's
    probability (raises the target's) is kept; the search stops once the model is fooled.
    With update_each_iteration every improvement is kept at once (restarts unused);
    otherwise restarts rounds of max_iterations candidates each build on the best so far.

    Equivalence: bit-exact with torchattacks 3.5.1 Pixle (same np.random.seed, same
    device, every pixel_mapping, both update modes, untargeted and every targeted mode)
    on square images. Differences, all where the reference fails:
      - non-square images: the reference swaps x and y when it writes the moved pixels
        and raises IndexError once one falls outside; fastadv writes them at (y, x) there.
      - update_each_iteration with a batch of more than one image: the reference asserts
        a batch of one; fastadv attacks every image.
      - restarts, max_iterations must be >= 1 (0 returns the clean images in the reference).
    One forward per candidate instead of the reference's two (loss, then success)
    where the model's output depends on its input only (not under
    set_model_training_mode). The search runs on the host: every candidate syncs.

    Arguments:
        model (nn.Module): model to attack.
        x_dimensions, y_dimensions: patch width / height range, (low, high) ints > 0 in
            pixels or floats in [0, 1] of the image side, or one value. (Default: (2, 10))
        pixel_mapping (str): one of 'random', 'similarity', 'similarity_random',
            'distance', 'distance_random'. (Default: 'random')
        restarts (int): rounds, >= 1. (Default: 20)
        max_iterations (int): candidates per round, >= 1. (Default: 10)
        update_each_iteration (bool): keep every improvement at once. (Default: False)
        backend, **engine: see fastadv.Attack (Pixle has no kernels).

    Shape:
        images: (N, C, H, W) in [0, 1]; labels: (N,); output: (N, C, H, W).

    Example::
        >>> attack = fastadv.Pixle(model, x_dimensions=(0.1, 0.2), restarts=10, max_iterations=50)
        >>> adv_images = attack(images, labels)
    """

    def __init__(self, model: nn.Module, x_dimensions: Union[float, Tuple[float, float]] = (2, 10),
                 y_dimensions: Union[float, Tuple[float, float]] = (2, 10),
                 pixel_mapping: Literal["random", "similarity", "similarity_random", "distance", "distance_random"] = "random",
                 restarts: int = 20, max_iterations: int = 10, update_each_iteration: bool = False, *,
                 backend: Optional[str] = None, **engine: Unpack[EngineKwargs]) -> None:
        super().__init__("Pixle", model, backend=backend, **engine)
        x_dimensions, y_dimensions, pixel_mapping, restarts, max_iterations = check_pixle_args(
            x_dimensions, y_dimensions, pixel_mapping, restarts, max_iterations)
        # in the reference's order (its repr's order)
        self.update_each_iteration = bool(update_each_iteration)
        self.max_patches = max_iterations
        self.restarts = restarts
        self.pixel_mapping = pixel_mapping
        self.p1_x_dimensions = x_dimensions
        self.p1_y_dimensions = y_dimensions
        self.supported_mode = ["default", "targeted"]

    def forward(self, images, labels):
        x, y = self._prepare(images, labels)
        return pixle_loop(
            self.get_logits, x, self._targets(x, y), x_dimensions=self.p1_x_dimensions,
            y_dimensions=self.p1_y_dimensions, pixel_mapping=self.pixel_mapping, restarts=self.restarts,
            max_iterations=self.max_patches, update_each_iteration=self.update_each_iteration,
            targeted=self.targeted, deterministic=not self._model_training, engine=self.engine,
        )
