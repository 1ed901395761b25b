"""Type aliases of the public API (the signatures of the attacks, fit and evaluate)."""
import os
from typing import Callable, Optional, Tuple, TypedDict, Union

import torch
from torch.utils.data import DataLoader, Dataset

try:
    from typing import Unpack
except ImportError:  # Python 3.10
    from typing_extensions import Unpack

Model = Callable[[torch.Tensor], torch.Tensor]
"""A classifier: images in [0, 1] to logits [N, C] (an nn.Module, or any such callable)."""

Budget = Union[float, torch.Tensor]
"""A budget or step size: a float, or a per-sample [N] tensor (plain functions only)."""


Data = Union[DataLoader, Dataset, Tuple[torch.Tensor, torch.Tensor], torch.Tensor]
"""What fit and evaluate take: a DataLoader, a map-style Dataset, an (images, labels) pair, or
images followed by labels as the next argument."""

PathLike = Union[str, os.PathLike]


class EngineKwargs(TypedDict, total=False):
    """The keywords every attack takes for fastadv.engine.EngineOptions (``**engine``)."""

    precision: Optional[str]
    channels_last: bool
    early_stop: bool
    batch_size: Optional[int]
    cuda_graph: Optional[bool]
    fast: bool
    cycle_exit: Optional[bool]


__all__ = ["Budget", "Data", "EngineKwargs", "Model", "PathLike", "Unpack"]
