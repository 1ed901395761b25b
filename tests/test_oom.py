"""A real out-of-memory fault: the CPU allocator fails under an address-space limit,
the engine halves the chunk and returns what an unconstrained run returns.

The attack runs in a child process whose address space is capped (RLIMIT_AS) a
little above what it already uses, so attacking the whole batch at once cannot
allocate its activations while a small chunk can. Linux only (RLIMIT_AS).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fastadv.functional as F

resource = pytest.importorskip("resource")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux")

WIDTH = 4096  # copies of the 64 inputs per sample: 1 MiB of fp32 per activation per sample
BATCH = 64    # ~5 activations of 1 MiB each per sample in forward + backward: ~320 MiB at once
HEADROOM = 96 * 2**20  # what the child may allocate beyond its size after warm-up


class WideNet(nn.Module):
    """Per-sample activations of WIDTH x 64 floats; no cross-sample arithmetic, so a
    sample's result does not depend on which chunk it is attacked in."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(WIDTH * 64) * 0.1)

    def forward(self, x):
        h = torch.relu(x.flatten(1).repeat(1, WIDTH) * self.scale)
        return h.view(x.shape[0], 8, -1).sum(-1)


CHILD = textwrap.dedent("""
    import json, resource, sys, warnings
    import torch
    from test_oom import WideNet, HEADROOM
    import fastadv.functional as F

    torch.set_num_threads(1)
    saved = torch.load(sys.argv[1], weights_only=True)
    model = WideNet()
    model.load_state_dict(saved["model"])
    x, y = saved["x"], saved["y"]
    F.pgd(model, x[:1], y[:1], steps=1)  # warm-up: lazy initialisation happens before the cap

    def vm_size():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

    cap = vm_size() + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        torch.empty(BATCH_BYTES, dtype=torch.uint8)
        whole_fits = True
    except RuntimeError:
        whole_fits = False
    torch.manual_seed(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adv = F.pgd(model, x, y, eps=0.1, alpha=0.02, steps=3)
    torch.save(adv, sys.argv[1] + ".adv")
    print(json.dumps({"whole_fits": whole_fits, "warnings": [str(w.message) for w in caught]}))
""")


def test_cpu_out_of_memory_halves_the_chunk_and_loses_nothing(tmp_path):
    torch.manual_seed(0)
    model = WideNet()
    x = torch.rand(BATCH, 1, 8, 8)
    y = torch.randint(0, 8, (BATCH,))
    inputs = tmp_path / "inputs.pt"
    torch.save({"model": model.state_dict(), "x": x, "y": y}, inputs)
    script = CHILD.replace("BATCH_BYTES", str(BATCH * WIDTH * 64 * 4 * 5))

    child = subprocess.run([sys.executable, "-c", script, str(inputs)],
                           capture_output=True, text=True, timeout=300,
                           env=_env_with_tests_on_path())
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert not report["whole_fits"], "the cap did not constrain the child: the test would prove nothing"
    halvings = [w for w in report["warnings"] if "out of memory" in w]
    assert halvings and "CPU out of memory; continuing with chunks of" in halvings[0], report

    torch.manual_seed(5)
    expected = F.pgd(model, x, y, eps=0.1, alpha=0.02, steps=3)
    assert torch.equal(torch.load(str(inputs) + ".adv", weights_only=True), expected)


def _env_with_tests_on_path():
    env = dict(os.environ)
    tests = str(Path(__file__).parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests, env.get("PYTHONPATH")) if p)
    return env
