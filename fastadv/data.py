"""Embedded real data: scikit-learn's bundled handwritten digits (no download)."""
import torch


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
