"""Device helpers shared by the step kernels.

PyTorch evaluates each eager op in fp32 ("opmath") and rounds its result to the
tensor's dtype. The kernels keep one fp32 register value per element and call
``rnd`` after every op the reference performs, so fp16/bf16 results equal the
reference op chain bit for bit. For fp32 tensors ``rnd`` compiles to nothing.
"""
import triton
import triton.language as tl


@triton.jit
def rnd(v, DTYPE: tl.constexpr):
    """Round an fp32 value to DTYPE (nearest, ties to even) and back; a no-op for fp32."""
    if DTYPE == tl.bfloat16:
        # Integer rounding, because Triton's interpreter truncates fp32 -> bf16
        # casts while the compiled kernel rounds; this way both agree with torch.
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, v, u.to(tl.float32, bitcast=True))
    elif DTYPE == tl.float16:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def sign(v):
    """torch.sign with the CPU convention sign(0) = sign(NaN) = 0."""
    return tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))


@triton.jit
def clamp(v, lo, hi):
    """torch.clamp(v, lo, hi) = min(max(v, lo), hi), propagating NaN like torch."""
    return minimum(tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL), hi)


@triton.jit
def minimum(a, b):
    """torch.minimum: NaN in, NaN out (PTX min.f32 would drop it)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def sample_row(sample_numel, BLOCK: tl.constexpr):
    """One program per sample: its index, its elements' offsets and their mask.
    Offsets are int64, so index arithmetic never wraps past 2**31 elements."""
    sample = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    return sample, sample * sample_numel + cols, cols < sample_numel


@triton.jit
def sample_tile(sample_numel, TILE: tl.constexpr):
    """Programs over (tile, sample): the tile and sample indices, the tile's offsets and mask."""
    tile, sample = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    cols = tile * TILE + tl.arange(0, TILE)
    return tile, sample, sample * sample_numel + cols, cols < sample_numel


@triton.jit
def element_samples(start, sample_numel, BLOCK: tl.constexpr):
    """The sample of each element start + arange(BLOCK) (start is int64): one 64-bit
    division per program, then 32-bit ones per element. (A 64-bit division per element
    compiles to a subroutine call with a stack frame; the offset within the first
    sample plus BLOCK fits int32 for any sample below 2**31 - BLOCK elements.)"""
    first = start // sample_numel
    local = (start - first * sample_numel).to(tl.int32) + tl.arange(0, BLOCK)
    return first + (local // sample_numel).to(tl.int64)


@triton.jit
def load_f32(ptr, offs, mask):
    """Masked load as fp32 registers (masked-off lanes read 0)."""
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def sample_eps(value, value_ptr, sample, PER_SAMPLE: tl.constexpr):
    """A budget or step size for a program's sample (a scalar index): the scalar, or value_ptr[sample]."""
    # One return, assigned in the branch: a jit function whose returns differ in type
    # (block in one constexpr branch, scalar in the other) does not compile.
    v = value
    if PER_SAMPLE:
        v = tl.load(value_ptr + sample).to(tl.float32)
    return v


@triton.jit
def element_eps(value, value_ptr, sample, mask, PER_SAMPLE: tl.constexpr):
    """The same for a block of elements whose samples are the block sample: masked-off
    lanes (past the last sample) read nothing."""
    v = value
    if PER_SAMPLE:
        v = tl.load(value_ptr + sample, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def total(v, axis):
    """tl.sum, built on tl.reduce with our own combine function: tl.sum itself is a
    @jit function of Triton's library, which the interpreter cannot run when Triton
    was first imported in compiled mode. Same reduction tree as tl.sum."""
    return tl.reduce(v, axis, _add)
