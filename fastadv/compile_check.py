"""Compile the Triton kernels for GPU targets on a machine without a GPU, and read what came out.

Triton compiles a kernel for the specialization of its launch arguments (dtypes,
16-byte alignment, divisibility by 16, constexprs) and only then needs a device to
run it. :func:`compile_only` installs a driver whose current target is a chosen GPU
(``GPUTarget("cuda", cc, 32)``) and turns every ``kernel[grid](...)`` launch into
Triton's own warm-up (``JITFunction.run(..., warmup=True)``): the real launchers,
called on CPU tensors, compile exactly what they would on that GPU and run nothing,
so their outputs are left unwritten. The compiled kernels are collected with their
specialization, and :func:`inspect` reads registers, spills and global accesses from
the PTX and the cubin (``cuobjdump``/``nvdisasm`` ship in the triton wheel).

:func:`twin_launches` goes one step further for whole attacks: each launcher the
attack calls through the ``interpret`` backend is first compiled for the GPU target
(from the very arguments the attack passes), then run by Triton's interpreter, so
the attack's loop gets real values and keeps going.

This module is for tests and ``benchmarks/static_tables.py``; the product never
imports it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import subprocess
import tempfile

import torch

TARGETS = (80, 90, 100)  # sm_80 (A100), sm_90 (H100/H200), sm_100 (B200)


class _TargetDriver:
    """The part of a Triton driver that compiling needs: a current GPU target and device."""

    def __init__(self, cc: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", cc, 32)
        self.device = f"compile-only-sm{cc}"  # Triton caches compiled kernels per device: one cache per target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@dataclasses.dataclass
class Compiled:
    """One kernel as a launcher compiled it: its name, how it was specialized, the artefacts."""

    name: str  # the @triton.jit function
    cc: int  # compute capability of the target
    spec: str  # dtypes, alignment and constexprs of the launch, for failure messages
    kernel: object  # triton's CompiledKernel (asm: ttir, ttgir, llir, ptx, cubin)

    @property
    def ptx(self) -> str:
        return self.kernel.asm["ptx"]

    def __str__(self):
        return f"{self.name}[{self.spec}] on sm_{self.cc}"


def _describe(fn, args, kwargs) -> str:
    """The launch's specialization in words: pointer dtypes with 16-byte alignment, scalar types, constexprs."""
    parts = []
    for param, value in zip(fn.arg_names, args):
        if isinstance(value, torch.Tensor):
            aligned = "" if value.data_ptr() % 16 == 0 else " unaligned"
            parts.append(f"{param}:{str(value.dtype).removeprefix('torch.')}{aligned}")
    parts += [f"{k}={v}" for k, v in kwargs.items() if k not in ("enable_fp_fusion",)]
    return ", ".join(parts)


@contextlib.contextmanager
def compile_only(cc: int):
    """Within the block, kernel launches compile for sm_<cc> and run nothing.

    Yields the list of :class:`Compiled` kernels, appended to as launches happen.
    A kernel that fails to compile raises Triton's error, prefixed with its name,
    specialization and target.
    """
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    compiled: list[Compiled] = []
    real_run = JITFunction.run

    @functools.wraps(real_run)
    def warmup_run(self, *args, grid, warmup, **kwargs):
        spec = _describe(self, args, kwargs)
        try:
            kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as err:
            raise RuntimeError(f"{self.fn.__name__}[{spec}] does not compile for sm_{cc}: {err}") from err
        compiled.append(Compiled(self.fn.__name__, cc, spec, kernel))
        return kernel

    saved = driver._active
    driver.set_active(_TargetDriver(cc))
    JITFunction.run = warmup_run
    try:
        yield compiled
    finally:
        JITFunction.run = real_run
        driver._active = saved


@contextlib.contextmanager
def twin_launches(cc: int):
    """Within the block, every launcher called through the ``interpret`` backend is first
    compiled for sm_<cc> with the same arguments, then run by the interpreter.

    Yields the list of :class:`Compiled` kernels. Use with ``backend='interpret'`` on CPU
    tensors: the attack's Python runs the launchers as the Triton backend would call them.
    """
    from fastadv import kernels

    real = kernels.interpreted()
    compiled: list[Compiled] = []

    class Twins:
        def __getattr__(self, name):
            interpreted_launcher = getattr(real, name)
            gpu_launcher = getattr(kernels.compiled(), name)

            def launch(*args, **kwargs):
                with compile_only(cc) as found:
                    gpu_launcher(*args, **kwargs)
                compiled.extend(found)
                return interpreted_launcher(*args, **kwargs)

            return launch

    kernels._copies[True] = Twins()
    try:
        yield compiled
    finally:
        kernels._copies[True] = real


# --- reading the artefacts ---

_BIN = None


def tool(name: str) -> str:
    """Path of a CUDA tool (ptxas, cuobjdump, nvdisasm) shipped in the triton wheel."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


@dataclasses.dataclass
class Profile:
    """What the compiled code does, read from PTX and SASS."""

    registers: int
    spills: int  # bytes of local memory (stack frame + spill stores)
    shared: int  # bytes of static shared memory
    ptx_loads: dict  # width in bits -> count of ld.global in PTX
    ptx_stores: dict  # width in bits -> count of st.global in PTX
    sass_loads: dict  # width in bits -> count of LDG in SASS
    sass_stores: dict  # width in bits -> count of STG in SASS
    local_ops: int  # ld.local/st.local in PTX and LDL/STL in SASS


_PTX_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z0-9_]+)*?(?:\.v(\d))?\.(b|f|u|s)(\d+)\b")
_SASS_ACCESS = re.compile(r"\b(LDG|STG)\.E(?:\.[A-Z0-9_]+)*")


def _count(pattern_hits):
    out = {}
    for kind, width in pattern_hits:
        out.setdefault(kind, {}).setdefault(width, 0)
        out[kind][width] += 1
    return out


def _sass_width(op: str) -> int:
    for token in op.split(".")[2:]:
        if token in ("64", "128", "U8", "S8", "U16", "S16"):
            return {"64": 64, "128": 128, "U8": 8, "S8": 8, "U16": 16, "S16": 16}[token]
    return 32


def inspect(item: Compiled) -> Profile:
    """Registers, spills, shared memory and global accesses of one compiled kernel."""
    ptx = item.ptx
    ptx_hits = []
    for kind, vec, _, bits in _PTX_ACCESS.findall(ptx):
        ptx_hits.append((kind, int(vec or 1) * int(bits)))
    ptx_counts = _count(ptx_hits)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(item.kernel.asm["cubin"])
        sass = subprocess.run([tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    sass_hits = [(m.group(1), _sass_width(m.group(0))) for m in _SASS_ACCESS.finditer(sass)]
    sass_counts = _count(sass_hits)
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    local = int(re.search(r"LOCAL:(\d+)", res).group(1))
    shared = int(re.search(r"SHARED:(\d+)", res).group(1))
    local_ops = len(re.findall(r"\b(?:ld|st)\.local\b", ptx)) + len(re.findall(r"\b(?:LDL|STL)\b", sass))
    return Profile(
        registers=regs, spills=stack + local, shared=shared,
        ptx_loads=ptx_counts.get("ld", {}), ptx_stores=ptx_counts.get("st", {}),
        sass_loads=sass_counts.get("LDG", {}), sass_stores=sass_counts.get("STG", {}),
        local_ops=local_ops,
    )


# --- every launch configuration of the launchers ---

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "misaligned")
ROW_SHAPE = (3, 3, 5, 7)  # 105 elements per sample: the one-launch row path, sizes off any block
TILE_SHAPE = (2, 3, 29, 53)  # 4611 elements per sample (> MAX_ROW 4096): the tiled path


def image(shape, dtype, layout, seed=0):
    """A batch in [0, 1] in the given storage layout; 'misaligned' starts one element into its storage."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    if layout == "misaligned":
        return torch.rand(n + 1, generator=g).to(dtype)[1:].view(shape)
    t = torch.rand(shape, generator=g).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of a launcher: which, in which mode, on which inputs."""

    launcher: str
    mode: str  # e.g. "project eps=tensor alpha=float"
    dtype: torch.dtype
    layout: str
    path: str  # "row" (one program per sample or elementwise) or "tiled"

    def __str__(self):
        return f"{self.launcher}({self.mode}) {str(self.dtype).removeprefix('torch.')} {self.layout} {self.path}"

    def call(self, launchers):
        """Call the launcher on CPU tensors built for this case."""
        shape = TILE_SHAPE if self.path == "tiled" else ROW_SHAPE
        n = shape[0]
        adv, x, old = (image(shape, self.dtype, self.layout, seed) for seed in (0, 1, 2))
        grad = (image(shape, self.dtype, self.layout, 3) - 0.5)
        value = {"float": lambda v: v, "tensor": lambda v: torch.full((n,), v)}
        opts = dict(o.split("=") for o in self.mode.split() if "=" in o)
        fn = getattr(launchers, self.launcher)
        if self.launcher == "linf_step":
            return fn(adv, x, grad, alpha=value[opts["alpha"]](0.01), eps=value[opts["eps"]](0.03),
                      project="project" in self.mode.split())
        if self.launcher == "l2_step":
            return fn(adv, x, grad, alpha=0.2, eps=value[opts["eps"]](0.5))
        if self.launcher == "random_start":
            return fn(x, grad, scale=torch.rand(n).to(self.dtype) if opts["scale"] == "tensor" else None)
        if self.launcher == "mifgsm_step":
            return fn(adv, x, grad, old - 0.5, alpha=value[opts["alpha"]](0.01), eps=value[opts["eps"]](0.03), decay=1.0)
        if self.launcher == "apgd_linf_step":
            return fn(adv, old, x, grad, step=value[opts["step"]](0.02), eps=value[opts["eps"]](0.03), a=0.75)
        if self.launcher == "apgd_l2_step":
            return fn(adv, old, x, grad, step=value[opts["step"]](0.2), eps=value[opts["eps"]](0.5), a=0.75,
                      arithmetic=opts["arithmetic"])
        if self.launcher == "apgd_track_":
            flags = torch.arange(n) % 2 == 0
            return fn(adv, grad, x.clone(), grad.clone(), old.clone(), flags, ~flags)
        raise ValueError(f"no case for launcher {self.launcher!r}")


def _modes():
    """(launcher, mode, has a tiled path) for every mode of every launcher."""
    both = ("float", "tensor")
    for project in ("project", "no-project"):
        for eps in both:
            for alpha in both:
                yield "linf_step", f"{project} eps={eps} alpha={alpha}", False
    for eps in both:
        yield "l2_step", f"eps={eps}", True
    for scale in ("none", "tensor"):
        yield "random_start", f"scale={scale}", False
    for eps in both:
        for alpha in both:
            yield "mifgsm_step", f"eps={eps} alpha={alpha}", True
    for step in both:
        for eps in both:
            yield "apgd_linf_step", f"step={step} eps={eps}", False
            for arithmetic in ("torchattacks", "original"):
                yield "apgd_l2_step", f"arithmetic={arithmetic} step={step} eps={eps}", True
    yield "apgd_track_", "", False


def cases():
    """Every launcher, every mode, fp32/fp16/bf16, contiguous/channels_last/misaligned, row and tiled path."""
    for launcher, mode, tiled in _modes():
        for path in ("row", "tiled") if tiled else ("row",):
            for dtype in DTYPES:
                for layout in LAYOUTS:
                    yield Case(launcher, mode, dtype, layout, path)


def compile_case(case: Case, cc: int) -> list[Compiled]:
    """The kernels one case launches, compiled for sm_<cc>."""
    from fastadv import kernels

    with compile_only(cc) as found:
        case.call(kernels.compiled())
    return found
