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
    tensors: dict  # pointer parameter -> (torch dtype, 16-byte aligned)
    options: dict  # constexprs and launch options (BLOCK, PER_SAMPLE_EPS, num_warps, ...)
    kernel: object  # triton's CompiledKernel (asm: ttir, ttgir, llir, ptx, cubin)

    @property
    def ptx(self) -> str:
        return self.kernel.asm["ptx"]

    @property
    def spec(self) -> str:
        """The specialization in words, for failure messages and tables."""
        parts = [f"{p}:{str(d).removeprefix('torch.')}{'' if a else ' unaligned'}" for p, (d, a) in self.tensors.items()]
        parts += [f"{k}={v}" for k, v in self.options.items() if k != "enable_fp_fusion"]
        return ", ".join(parts)

    @property
    def key(self):
        return self.name, self.cc, self.spec

    def __str__(self):
        return f"{self.name}[{self.spec}] on sm_{self.cc}"


def _tensors(fn, args) -> dict:
    return {
        param: (value.dtype, value.data_ptr() % 16 == 0)
        for param, value in zip(fn.arg_names, args)
        if isinstance(value, torch.Tensor)
    }


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
        item = Compiled(self.fn.__name__, cc, _tensors(self, args), dict(kwargs), None)
        try:
            item.kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as err:
            raise RuntimeError(f"{item} does not compile: {err}") from err
        compiled.append(item)
        return item.kernel

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


def _profile_cache() -> str:
    """Profiles are kept by cubin hash beside Triton's own kernel cache, so a rerun that finds
    its kernels compiled (Triton's cache) also skips the disassembler."""
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return os.path.join(os.path.dirname(os.path.abspath(base)), "fastadv-profiles")


def inspect(item: Compiled) -> Profile:
    """Registers, spills, shared memory and global accesses of one compiled kernel."""
    import hashlib
    import json

    path = os.path.join(_profile_cache(), hashlib.sha256(item.kernel.asm["cubin"] + item.ptx.encode()).hexdigest() + ".json")
    try:
        with open(path) as f:
            return _from_json(json.load(f))
    except (OSError, ValueError, TypeError):
        pass
    profile = _inspect(item)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(profile), f)
    os.replace(tmp, path)
    return profile


def _from_json(d) -> Profile:
    for k in ("ptx_loads", "ptx_stores", "sass_loads", "sass_stores"):  # JSON keys are strings
        d[k] = {int(w): n for w, n in d[k].items()}
    return Profile(**d)


def _inspect(item: Compiled) -> Profile:
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
# 'odd': sizes that are no multiple of 16 (Triton then cannot prove a mask constant over a
# vector, so accesses are scalar); 'misaligned': storage starts one element past 16 bytes.
LAYOUTS = ("contiguous", "channels_last", "misaligned", "odd")
SHAPES = {  # (path, odd sizes) -> shape; 'tiled' samples exceed the row kernels' MAX_ROW of 4096
    ("row", False): (3, 3, 4, 8),
    ("row", True): (3, 3, 5, 7),
    ("tiled", False): (2, 3, 40, 48),
    ("tiled", True): (2, 3, 29, 53),
}


def image(shape, dtype, layout, seed=0):
    """A batch in [0, 1] in the given storage layout; 'misaligned' starts one element into its storage."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    if layout == "misaligned":  # the launchers keep this layout (dense, batch outermost)
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
    shape: tuple = None  # overrides SHAPES (e.g. a real image size for the static tables)

    def __str__(self):
        return f"{self.launcher}({self.mode}) {str(self.dtype).removeprefix('torch.')} {self.layout} {self.path}"

    def call(self, launchers):
        """Call the launcher on CPU tensors built for this case."""
        shape = self.shape or SHAPES[self.path, self.layout == "odd"]
        n = shape[0]
        adv, x, old = (image(shape, self.dtype, self.layout, seed) for seed in (0, 1, 2))
        grad = image(shape, self.dtype, self.layout, 3)
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
            return fn(adv, x, grad, old, alpha=value[opts["alpha"]](0.01), eps=value[opts["eps"]](0.03), decay=1.0)
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
    """Every launcher in every mode on every dtype (contiguous inputs), and every launcher on
    every dtype in every other layout (in its first mode: layouts change alignment and
    divisibility, which modes do not interact with); row and tiled path each."""
    seen = set()
    for launcher, mode, tiled in _modes():
        for path in ("row", "tiled") if tiled else ("row",):
            first = (launcher, path) not in seen
            seen.add((launcher, path))
            for dtype in DTYPES:
                for layout in LAYOUTS if first else LAYOUTS[:1]:
                    yield Case(launcher, mode, dtype, layout, path)


def compile_case(case: Case, cc: int) -> list[Compiled]:
    """The kernels one case launches, compiled for sm_<cc>."""
    from fastadv import kernels

    with compile_only(cc) as found:
        case.call(kernels.compiled())
    return found


# --- the design minimum: global traffic each kernel must have, and no more ---


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Global accesses of one program-thread's share of a kernel, by kind.

    reads/writes: image-sized tensors read / written once per element (the design minimum
    of the fused step); gathers: per-element loads of [N] per-sample values (bits each);
    scalars: per-program loads of one [N] value (32-bit); partials: [N, n_tiles] fp32 rows of
    partial sums read; partial_stores: one fp32 partial sum written per program.
    """

    reads: int
    writes: int
    gathers: tuple = ()
    scalars: int = 0
    partials: int = 0
    partial_stores: int = 0


def design(name: str, o: dict, dtype_bits: dict) -> Traffic:
    """The design minimum of kernel `name` with options `o` (its constexprs).
    dtype_bits maps pointer parameter -> element bits, for the gathers' widths."""
    t = lambda flag: int(bool(o.get(flag)))  # noqa: E731
    if name == "_linf_step_kernel":
        proj = t("PROJECT")
        return Traffic(2 + proj, 1, (32,) * (t("PER_SAMPLE_ALPHA") + proj * t("PER_SAMPLE_EPS")))
    if name == "_apgd_linf_kernel":
        return Traffic(4, 1, (32,) * (t("PER_SAMPLE_STEP") + t("PER_SAMPLE_EPS")))
    if name == "_start_kernel":
        return Traffic(2, 1, (dtype_bits["scale_ptr"],) if o.get("SCALE") else ())
    if name == "_apgd_track_kernel":  # adv and grad read, x_best, grad_best, x_best_adv written (masked by row)
        return Traffic(2, 3, (8, 8))
    if name == "_l2_row_kernel":
        return Traffic(3, 1, scalars=t("PER_SAMPLE_EPS"))
    if name in ("_sumsq_tile_kernel", "_abs_sum_tile_kernel"):
        return Traffic(1, 0, partial_stores=1)
    if name == "_l2_tile_kernel":
        if o["FINISH"]:
            return Traffic(3, 1, scalars=t("PER_SAMPLE_EPS"), partials=2)
        return Traffic(3, 0, partials=1, partial_stores=1)
    if name == "_mifgsm_row_kernel":
        return Traffic(4, 2, scalars=t("PER_SAMPLE_EPS") + t("PER_SAMPLE_ALPHA"))
    if name == "_mifgsm_tile_kernel":
        return Traffic(4, 2, scalars=t("PER_SAMPLE_EPS") + t("PER_SAMPLE_ALPHA"), partials=1)
    if name == "_apgd_l2_row_kernel":
        return Traffic(4, 1, scalars=t("PER_SAMPLE_STEP") + t("PER_SAMPLE_EPS"))
    if name == "_apgd_l2_tile_kernel":
        phase = o["PHASE"]
        if phase == 0:
            return Traffic(1, 0, partial_stores=1)
        step, eps = t("PER_SAMPLE_STEP"), t("PER_SAMPLE_EPS")
        if phase == 1:
            return Traffic(3, 0, scalars=step, partials=1, partial_stores=1)
        if phase == 2:
            return Traffic(4, 0, scalars=step + eps, partials=2, partial_stores=1)
        return Traffic(4, 1, scalars=step + eps, partials=3)
    raise KeyError(f"no design minimum written down for kernel {name}")


def _per_thread(item: Compiled):
    """(elements per thread, data element bits, threads) of a compiled kernel."""
    threads = 32 * item.options.get("num_warps", 4)
    block = item.options.get("BLOCK") or item.options.get("TILE")
    data = item.tensors.get("out_ptr") or item.tensors.get("adv_ptr") or item.tensors.get("grad_ptr") or item.tensors["v_ptr"]
    return max(1, block // threads), torch.finfo(data[0]).bits, threads


def expected_bits(item: Compiled) -> tuple[int, int, Traffic]:
    """(load bits, store bits) per thread that the design minimum allows, and the minimum."""
    dtype_bits = {p: (torch.finfo(d).bits if d.is_floating_point else torch.iinfo(d).bits) for p, (d, _) in item.tensors.items()}
    traffic = design(item.name, item.options, dtype_bits)
    per_thread, bits, threads = _per_thread(item)
    partial_bits = 32 * max(1, item.options.get("TILES_POW2", 1) // threads)
    loads = per_thread * (bits * traffic.reads + sum(traffic.gathers)) + 32 * traffic.scalars + partial_bits * traffic.partials
    stores = per_thread * bits * traffic.writes + 32 * traffic.partial_stores
    return loads, stores, traffic


def _bits(widths: dict) -> int:
    return sum(w * n for w, n in widths.items())


def problems(item: Compiled, profile: Profile, vector_expected: bool) -> list[str]:
    """What is wrong with one compiled kernel (empty when nothing): local memory, global
    traffic other than the design minimum, and, where vector_expected (aligned fp32 inputs
    whose sizes are multiples of 16), tensor traffic not moved in 128-bit accesses."""
    out = []
    if profile.spills or profile.local_ops:
        out.append(f"local memory: {profile.spills} bytes, {profile.local_ops} local loads/stores (spills)")
    loads, stores, traffic = expected_bits(item)
    for what, got, want in (("load", profile.ptx_loads, loads), ("store", profile.ptx_stores, stores)):
        if _bits(got) != want:
            out.append(f"global {what} bits per thread {_bits(got)} {got}, design minimum {want} ({traffic})")
    # ptxas may merge loads of one address (the per-sample flags), never add traffic or split vectors
    for what, ptx, sass in (("load", profile.ptx_loads, profile.sass_loads), ("store", profile.ptx_stores, profile.sass_stores)):
        if _bits(sass) > _bits(ptx) or sass.get(128, 0) != ptx.get(128, 0):
            out.append(f"SASS global {what}s {sass} do not match PTX {ptx}")
    if vector_expected:
        per_thread, bits, _ = _per_thread(item)
        for what, got, n in (("load", profile.ptx_loads, traffic.reads), ("store", profile.ptx_stores, traffic.writes)):
            if got.get(128, 0) * 128 < per_thread * bits * n:
                out.append(f"{what}s not 128-bit: {got} for {n} tensors of {per_thread} fp32 per thread")
    return out


def vector_expected(case: Case, item: Compiled) -> bool:
    """Whether the design asks for 128-bit accesses: aligned fp32 inputs of sizes that are multiples of 16."""
    return case.dtype == torch.float32 and case.layout in ("contiguous", "channels_last")


@dataclasses.dataclass
class Result:
    cc: int
    case: Case
    item: Compiled
    profile: Profile | None
    problems: list


def check_all(targets=TARGETS, selected=None, workers: int = 4) -> list[Result]:
    """Compile every case for every target and check each distinct kernel once.

    A case that fails to compile gives a Result with the error as its problem.
    """
    from concurrent.futures import ThreadPoolExecutor

    results, first = [], {}
    for cc in targets:
        for case in selected if selected is not None else cases():
            try:
                items = compile_case(case, cc)
            except RuntimeError as err:
                results.append(Result(cc, case, None, None, [str(err)]))
                continue
            for item in items:
                results.append(Result(cc, case, item, None, []))
                first.setdefault(item.key, item)
    with ThreadPoolExecutor(workers) as pool:  # the tools run as subprocesses: threads overlap them
        profiles = dict(zip(first, pool.map(inspect, first.values())))
    for r in results:
        if r.item is not None:
            r.profile = profiles[r.item.key]
            r.problems = problems(r.item, r.profile, vector_expected(r.case, r.item))
    return results


def report(results: list[Result]) -> str:
    """One line per problem, naming the case, the kernel, its specialization and target."""
    lines = []
    for r in results:
        for p in r.problems:
            lines.append(f"{r.case}: {p}" if r.item is None else f"{r.case}: {r.item}: {p}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """python -m fastadv.compile_check [cc ...]: compile and check everything; exit 1 on any problem."""
    import sys
    import time

    import triton

    argv = sys.argv[1:] if argv is None else argv
    targets = tuple(int(a) for a in argv) or TARGETS
    t0 = time.perf_counter()
    results = check_all(targets)
    bad = report(results)
    kernels_checked = len({r.item.key for r in results if r.item is not None})
    print(f"triton {triton.__version__}: {len(results)} launches, {kernels_checked} distinct kernels, "
          f"targets {', '.join(f'sm_{t}' for t in targets)}, {time.perf_counter() - t0:.1f} s")
    if bad:
        print(bad)
        return 1
    print("all compile; no local memory; global traffic at the design minimum; 128-bit where aligned fp32")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
