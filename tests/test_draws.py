"""fastadv.draws: the cheap uniform draw gives randn_like(x).uniform_'s values and generator state."""
import pytest
import torch

from fastadv import draws

LIKES = {
    "images": lambda: torch.rand(64, 3, 32, 32),
    "odd count": lambda: torch.rand(7, 3, 5, 5),  # 525: the normal fill redraws a 16-element tail
    "exactly 16": lambda: torch.rand(16),
    "under 16": lambda: torch.rand(3, 5),  # another normal path: drawn as the reference draws
    "channels_last": lambda: torch.rand(4, 3, 6, 6).contiguous(memory_format=torch.channels_last),
    "float64": lambda: torch.rand(4, 1, 8, 8, dtype=torch.float64),
    "float16": lambda: torch.rand(4, 1, 8, 8).half(),
    "bfloat16": lambda: torch.rand(4, 1, 8, 8).bfloat16(),
    "a view": lambda: torch.rand(8, 3, 9, 9)[:, :, 1:],
}


def test_this_torch_takes_the_shortcut():
    """Otherwise every test below would pass through the fallback alone."""
    assert draws._uniform_fill_advances_as_normal_fill()


@pytest.mark.parametrize("name", LIKES)
def test_same_values_and_generator_state_as_randn_like_then_uniform(name):
    like = LIKES[name]()
    torch.manual_seed(3)
    expected = torch.randn_like(like).uniform_(-0.25, 0.25)
    expected_state, expected_next = torch.get_rng_state(), torch.rand(5)
    torch.manual_seed(3)
    got = draws.uniform_after_discarded_normal(like, -0.25, 0.25)
    assert torch.equal(torch.get_rng_state(), expected_state)
    assert torch.equal(torch.rand(5), expected_next)
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.stride() == expected.stride()
    assert torch.equal(got, expected)


def test_the_shortcut_skips_the_normal_fill(monkeypatch):
    """The cheap path makes no normal draw (the point of it); the probe alone may."""
    draws._uniform_fill_advances_as_normal_fill()
    calls = []
    monkeypatch.setattr(torch, "randn_like", lambda *a, **k: calls.append(a) or torch.zeros(1))
    draws.uniform_after_discarded_normal(torch.rand(64, 3, 8, 8), -1, 1)
    assert calls == []
    draws.uniform_after_discarded_normal(torch.rand(3), -1, 1)  # under 16: the reference's own draw
    assert len(calls) == 1
