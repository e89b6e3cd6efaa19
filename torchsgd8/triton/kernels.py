"""The Triton kernels: the SGD rule (csrc/sgd_rule.h) and the 8-bit blockwise codec (csrc/quant.h).

Every kernel serves a whole list of tensors in one launch. launch.py describes the call's tensors in an
int64 table, one row of TABLE_WIDTH entries per tensor (addresses, sizes, block layout, first program), and
an int32 table naming each program's tensor; a program then works on one unit of its tensor: UPDATE_CHUNK
consecutive elements in `sgd_update_kernel`, BLOCKS consecutive 256-element blocks in the blockwise kernels
(consecutive blocks are adjacent in memory in every layout, so a unit is one contiguous range). Units whose
blocks are all whole and start at multiples of 256 elements ("regular") take an unmasked path that the
compiler vectorises; the others take a masked path that finds each block's start and size.

Numerics, matching the C++ CPU kernels bit for bit:
  * arithmetic in float32 for float32/bfloat16/float16 params, float64 for float64;
  * every `x + a * y` of the rule is one tl.fma, and `momentum * buf` is rounded first;
  * divisions (grads by the grad scale, values by absmax) are IEEE-rounded: tl.math.div_rn for float32
    (Triton's `/` is an approximate division for float32 on NVIDIA GPUs), `/` for float64;
  * bfloat16 is read and written through its bits: loads shift them into a float32, stores round to
    nearest even in integer arithmetic (as the AVX-512 CPU kernels do) - Triton's interpreter converts
    float32 to bfloat16 by truncation and mishandles subnormals, so its conversions would not be
    the GPU's;
  * absmax is the NaN-propagating max |v| of a block (canonical NaN 0x7fc00000); an all-zero block stores
    absmax 0 and the code of 0.0; codes are the exact nearest code of v / absmax, ties to the smaller
    magnitude, by the bucket lookup of quant.h's nearest_code.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Columns of the per-tensor table (launch.py builds it). Addresses are byte addresses.
PARAM = tl.constexpr(0)  # param (update kernels), values (quantize) or out (dequantize)
GRAD = tl.constexpr(1)  # grad (update kernels)
STATE = tl.constexpr(2)  # momentum buffer (sgd_update) or codes (blockwise kernels)
ABSMAX = tl.constexpr(3)  # absmax (blockwise kernels)
NUMEL = tl.constexpr(4)
ROW_LENGTH = tl.constexpr(5)  # elements per row of the block layout (quant.h, BlockLayout)
BLOCKS_PER_ROW = tl.constexpr(6)
NUM_BLOCKS = tl.constexpr(7)
REGULAR_BLOCKS = tl.constexpr(8)  # blocks 0 .. REGULAR_BLOCKS-1 are whole and start at block * BLOCK_SIZE
FIRST_PROGRAM = tl.constexpr(9)  # the program that works on the tensor's first unit
TABLE_WIDTH = tl.constexpr(10)


# ---- the table, memory access ------------------------------------------------------------------------------


@triton.jit
def _program_unit(program_tensor, tensor_table):
    """(tensor index, its entry: a pointer to its row of the table, this program's unit index in the tensor)."""
    pid = tl.program_id(0)
    tensor = tl.load(program_tensor + pid)
    entry = tensor_table + tensor.to(tl.int64) * TABLE_WIDTH
    unit = pid.to(tl.int64) - tl.load(entry + FIRST_PROGRAM)
    return tensor, entry, unit


@triton.jit
def _typed_pointer(entry, column, STORAGE: tl.constexpr, ALIGNED: tl.constexpr):
    """The address in the table as a pointer to STORAGE; ALIGNED: the launcher checked that every address of
    the call is a multiple of 16 bytes, which lets the compiler use 16-byte loads and stores."""
    pointer = tl.load(entry + column).to(tl.pointer_type(STORAGE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _load_float(pointer, offsets, mask, ACC: tl.constexpr):
    """Values at pointer + offsets as ACC. bfloat16 is stored as its uint16 bits: a float32 holds them in its
    upper half, exactly."""
    raw = tl.load(pointer + offsets, mask=mask)
    if raw.dtype == tl.uint16:
        return (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return raw.to(ACC)


@triton.jit
def _bfloat16_bits(value):
    """float32 -> bfloat16 bits, rounded to nearest even; a NaN stays a NaN (quieted, sign and upper payload
    kept)."""
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return tl.where((bits & 0x7FFFFFFF) > 0x7F800000, quiet_nan, rounded).to(tl.uint16)


@triton.jit
def _store_float(pointer, offsets, value, mask):
    """Stores value (float32/float64) at pointer + offsets in the pointer's type, rounded to nearest even."""
    if pointer.dtype.element_ty == tl.uint16:
        tl.store(pointer + offsets, _bfloat16_bits(value), mask=mask)
    else:
        tl.store(pointer + offsets, value.to(pointer.dtype.element_ty), mask=mask)


# ---- the SGD rule (csrc/sgd_rule.h) ------------------------------------------------------------------------


@triton.jit
def _divide(numerator, denominator):
    """IEEE division, rounded to nearest."""
    if numerator.dtype == tl.float32:
        return tl.math.div_rn(numerator, denominator)
    return numerator / denominator


@triton.jit
def sgd_rule(param, grad, buf, lr, momentum, dampening_complement, weight_decay, grad_scale_ptr,
             MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, FIRST_STEP: tl.constexpr,
             NESTEROV: tl.constexpr):
    """torch.optim.SGD's update of one tile, in the accumulation type: (new param, new buffer).

    d = grad (/ the grad scale at grad_scale_ptr unless it is None), negated with MAXIMIZE, + weight_decay * param with
    WEIGHT_DECAY; with MOMENTUM (buffers in use and a momentum value other than 0): buf = d on the first step
    (buf is not read), else momentum * buf + dampening_complement * d, and d = d + momentum * buf with
    NESTEROV, else buf; param - lr * d. Without MOMENTUM buf comes back as it went in. Each `x + a * y` is one
    fma; `momentum * buf` is rounded first.
    """
    d = grad
    if grad_scale_ptr is not None:
        d = _divide(d, tl.load(grad_scale_ptr).to(d.dtype))
    if MAXIMIZE:
        d = -d
    if WEIGHT_DECAY:
        d = tl.fma(param, weight_decay, d)
    if MOMENTUM:
        if FIRST_STEP:
            buf = d
        else:
            buf = tl.fma(d, dampening_complement, momentum * buf)
        if NESTEROV:
            d = tl.fma(buf, momentum, d)
        else:
            d = buf
    return tl.fma(d, -lr, param), buf


@triton.jit
def _runs(found_inf_ptr):
    """Whether the step runs: not when GradScaler's found_inf is given and nonzero (then nothing is written)."""
    runs = True
    if found_inf_ptr is not None:
        runs = tl.load(found_inf_ptr) == 0
    return runs


@triton.jit
def _hyperparameters(lr_ptr, momentum_ptr, constants_ptr, ACC: tl.constexpr):
    """lr, momentum, whether its value (before rounding, as the CPU kernels decide) is not 0, 1 - dampening,
    weight decay: read on the device, in ACC."""
    momentum = tl.load(momentum_ptr)
    return (tl.load(lr_ptr).to(ACC), momentum.to(ACC), momentum != 0, tl.load(constants_ptr).to(ACC),
            tl.load(constants_ptr + 1).to(ACC))


# ---- stochastic rounding of bfloat16 params (csrc/sgd_rule.h) ----------------------------------------------


@triton.jit
def _mix32(x):
    """MurmurHash3's finaliser on uint32."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _rounding_noise(seed, tensor, index):
    """rounding_noise(seed, tensor, index) of sgd_rule.h: seed int64, tensor int32, index int64 tile."""
    index_high = (index >> 32).to(tl.uint32)
    key = _mix32((tensor.to(tl.uint32) * 0x9E3779B9) ^ index_high)
    key = _mix32((seed >> 32).to(tl.uint32) ^ key)
    key = _mix32(seed.to(tl.uint32) ^ key)
    return _mix32(key ^ index.to(tl.uint32))


@triton.jit
def _stochastic_bfloat16_bits(value, noise):
    """stochastic_round_bf16_bits of sgd_rule.h: the noise's low 16 bits added below the bfloat16 mantissa of
    finite values, then truncated."""
    bits = value.to(tl.uint32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    bits = tl.where(finite, bits + (noise & 0xFFFF), bits)
    return (bits >> 16).to(tl.uint16)


@triton.jit
def _store_param(pointer, offsets, value, mask, seed_ptr, tensor, first_index):
    """Stores the new params; with a rounding seed (bfloat16 only) rounded stochastically, element i of the
    tile being element first_index + offsets[i] of tensor `tensor` of the call."""
    if seed_ptr is None:
        _store_float(pointer, offsets, value, mask)
    else:
        noise = _rounding_noise(tl.load(seed_ptr), tensor, first_index + offsets)
        tl.store(pointer + offsets, _stochastic_bfloat16_bits(value, noise), mask=mask)


# ---- sgd_update: full-precision momentum -------------------------------------------------------------------


@triton.jit
def _sgd_update_tile(param_ptr, grad_ptr, buf_ptr, offsets, mask, lr, momentum, dampening_complement,
                     weight_decay, grad_scale_ptr, seed_ptr, tensor, first_index, ACC: tl.constexpr,
                     MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                     FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr):
    param = _load_float(param_ptr, offsets, mask, ACC)
    grad = _load_float(grad_ptr, offsets, mask, ACC)
    buf = None
    if MOMENTUM and not FIRST_STEP:
        buf = _load_float(buf_ptr, offsets, mask, ACC)
    param, buf = sgd_rule(param, grad, buf, lr, momentum, dampening_complement, weight_decay, grad_scale_ptr,
                          MOMENTUM, MAXIMIZE, WEIGHT_DECAY, FIRST_STEP, NESTEROV)
    _store_param(param_ptr, offsets, param, mask, seed_ptr, tensor, first_index)
    if MOMENTUM:
        _store_float(buf_ptr, offsets, buf, mask)


@triton.jit
def _sgd_update_unit(entry, unit, tensor, lr, momentum, dampening_complement, weight_decay, grad_scale_ptr, seed_ptr,
                     STORAGE: tl.constexpr, ACC: tl.constexpr, MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr,
                     WEIGHT_DECAY: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
                     ALIGNED: tl.constexpr, UPDATE_CHUNK: tl.constexpr):
    """Updates elements [unit * UPDATE_CHUNK, (unit + 1) * UPDATE_CHUNK) of the tensor (fewer at its end)."""
    start = unit * UPDATE_CHUNK
    param_ptr = _typed_pointer(entry, PARAM, STORAGE, ALIGNED) + start
    grad_ptr = _typed_pointer(entry, GRAD, STORAGE, ALIGNED) + start
    buf_ptr = None
    if MOMENTUM:
        buf_ptr = _typed_pointer(entry, STATE, STORAGE, ALIGNED) + start
    offsets = tl.arange(0, UPDATE_CHUNK)
    remaining = tl.load(entry + NUMEL) - start
    if remaining >= UPDATE_CHUNK:
        _sgd_update_tile(param_ptr, grad_ptr, buf_ptr, offsets, None, lr, momentum, dampening_complement,
                         weight_decay, grad_scale_ptr, seed_ptr, tensor, start, ACC, MOMENTUM, MAXIMIZE, WEIGHT_DECAY,
                         FIRST_STEP, NESTEROV)
    else:
        _sgd_update_tile(param_ptr, grad_ptr, buf_ptr, offsets, offsets < remaining, lr, momentum,
                         dampening_complement, weight_decay, grad_scale_ptr, seed_ptr, tensor, start, ACC, MOMENTUM,
                         MAXIMIZE, WEIGHT_DECAY, FIRST_STEP, NESTEROV)


@triton.jit
def sgd_update_kernel(tensor_table, program_tensor, lr_ptr, momentum_ptr, constants_ptr, grad_scale_ptr,
                      found_inf_ptr, seed_ptr,
                      STORAGE: tl.constexpr, ACC: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                      MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, FIRST_STEP: tl.constexpr,
                      NESTEROV: tl.constexpr, ALIGNED: tl.constexpr, UPDATE_CHUNK: tl.constexpr):
    """sgd_update over a list of tensors: each program updates UPDATE_CHUNK consecutive elements of one tensor.
    HAS_MOMENTUM: the call has buffers; they are neither read nor written when the momentum value is 0."""
    if _runs(found_inf_ptr):
        tensor, entry, unit = _program_unit(program_tensor, tensor_table)
        lr, momentum, momentum_is_nonzero, dampening_complement, weight_decay = _hyperparameters(
            lr_ptr, momentum_ptr, constants_ptr, ACC)
        if HAS_MOMENTUM:
            if momentum_is_nonzero:
                _sgd_update_unit(entry, unit, tensor, lr, momentum, dampening_complement, weight_decay, grad_scale_ptr,
                                 seed_ptr, STORAGE, ACC, True, MAXIMIZE, WEIGHT_DECAY, FIRST_STEP, NESTEROV,
                                 ALIGNED, UPDATE_CHUNK)
            else:
                _sgd_update_unit(entry, unit, tensor, lr, momentum, dampening_complement, weight_decay, grad_scale_ptr,
                                 seed_ptr, STORAGE, ACC, False, MAXIMIZE, WEIGHT_DECAY, FIRST_STEP, NESTEROV,
                                 ALIGNED, UPDATE_CHUNK)
        else:
            _sgd_update_unit(entry, unit, tensor, lr, momentum, dampening_complement, weight_decay, grad_scale_ptr,
                             seed_ptr, STORAGE, ACC, False, MAXIMIZE, WEIGHT_DECAY, FIRST_STEP, NESTEROV, ALIGNED,
                             UPDATE_CHUNK)


# ---- the blockwise codec (csrc/quant.h) --------------------------------------------------------------------


@triton.jit
def _block_absmax(values, mask):
    """NaN-propagating max |v| over axis 1 of a float32 tile (masked lanes excluded): |v|'s bits order as
    integers like the values, every NaN above +inf; a NaN becomes the canonical 0x7fc00000."""
    magnitude = values.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if mask is not None:
        magnitude = tl.where(mask, magnitude, 0)
    largest = tl.max(magnitude, axis=1)
    largest = tl.where(largest > 0x7F800000, 0x7FC00000, largest)
    return largest.to(tl.float32, bitcast=True)


@triton.jit
def _nearest_code(x, bucket_table, ZERO_CODE: tl.constexpr, BUCKET_SHIFT: tl.constexpr,
                  BUCKET_OFFSET: tl.constexpr, NUM_BUCKETS: tl.constexpr):
    """quant.h's nearest_code: the code nearest to x (|x| <= 1), ties to the smaller magnitude; NaN -> 255.
    |x|'s bits above BUCKET_SHIFT pick a bucket holding at most one threshold; its entry gives the count of
    thresholds below the bucket and that threshold's low bits."""
    magnitude = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    bucket = tl.minimum(tl.maximum((magnitude >> BUCKET_SHIFT) - BUCKET_OFFSET, 0), NUM_BUCKETS - 1)
    entry = tl.load(bucket_table + bucket)
    low_mask: tl.constexpr = (1 << BUCKET_SHIFT) - 1
    count = (entry >> BUCKET_SHIFT) + ((magnitude & low_mask) > (entry & low_mask)).to(tl.int32)
    return tl.where(x < 0, ZERO_CODE - tl.minimum(count, ZERO_CODE), ZERO_CODE + count)


@triton.jit
def _quantize_tile(values, absmax, bucket_table, ZERO_CODE: tl.constexpr, BUCKET_SHIFT: tl.constexpr,
                   BUCKET_OFFSET: tl.constexpr, NUM_BUCKETS: tl.constexpr):
    """uint8 codes of a float32 tile whose rows are blocks with the given absmax: the nearest code of the IEEE
    quotient v / absmax; ZERO_CODE for a block whose absmax is 0 (it holds only zeros; no 0 / 0 is done)."""
    scale = absmax[:, None]
    empty = scale == 0
    quotient = tl.math.div_rn(values, tl.where(empty, 1.0, scale))
    codes = _nearest_code(quotient, bucket_table, ZERO_CODE, BUCKET_SHIFT, BUCKET_OFFSET, NUM_BUCKETS)
    return tl.where(empty, ZERO_CODE, codes).to(tl.uint8)


@triton.jit
def _block_start(block, row_length, blocks_per_row, BLOCK_SIZE: tl.constexpr):
    """quant.h's BlockLayout::start: the first element of a block."""
    return (block // blocks_per_row) * row_length + (block % blocks_per_row) * BLOCK_SIZE


@triton.jit
def _unit_tile(entry, unit, BLOCKS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Where the BLOCKS blocks of a masked unit lie: (first element, offsets of the tile's elements from it,
    element mask, block mask). Tile row j is block unit * BLOCKS + j, of
    min(BLOCK_SIZE, row_length - (block % blocks_per_row) * BLOCK_SIZE) elements (BlockLayout::size); rows
    past the tensor's last block are masked out."""
    row_length = tl.load(entry + ROW_LENGTH)
    blocks_per_row = tl.load(entry + BLOCKS_PER_ROW)
    first_block = unit * BLOCKS
    first_element = _block_start(first_block, row_length, blocks_per_row, BLOCK_SIZE)
    block = first_block + tl.arange(0, BLOCKS).to(tl.int64)
    block_mask = block < tl.load(entry + NUM_BLOCKS)
    relative_start = (_block_start(block, row_length, blocks_per_row, BLOCK_SIZE) - first_element).to(tl.int32)
    block_size = tl.minimum(row_length - (block % blocks_per_row) * BLOCK_SIZE, BLOCK_SIZE).to(tl.int32)
    element = tl.arange(0, BLOCK_SIZE)
    offsets = relative_start[:, None] + element[None, :]
    mask = (element[None, :] < block_size[:, None]) & block_mask[:, None]
    return first_element, offsets, mask, block_mask


@triton.jit
def _blockwise_pointers(entry, unit, STORAGE: tl.constexpr, ALIGNED: tl.constexpr, BLOCKS: tl.constexpr):
    """A blockwise kernel's pointers: the values (param, values or out) and codes of the tensor, and the absmax of
    the unit's first block."""
    values_ptr = _typed_pointer(entry, PARAM, STORAGE, ALIGNED)
    code_ptr = _typed_pointer(entry, STATE, tl.uint8, ALIGNED)
    absmax_ptr = tl.load(entry + ABSMAX).to(tl.pointer_type(tl.float32)) + unit * BLOCKS
    return values_ptr, code_ptr, absmax_ptr


@triton.jit
def _whole_blocks(entry, unit, BLOCKS: tl.constexpr):
    """Whether the unit's blocks are all whole and start at multiples of the block size (the unmasked path)."""
    return (unit + 1) * BLOCKS <= tl.load(entry + REGULAR_BLOCKS)


@triton.jit
def _regular_tile(BLOCKS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Offsets of BLOCKS whole consecutive blocks from the first one's first element."""
    return tl.arange(0, BLOCKS)[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]


@triton.jit
def _sgd8bit_tile(param_ptr, grad_ptr, code_ptr, absmax_ptr, offsets, mask, block_mask, qmap, bucket_table,
                  lr, momentum, dampening_complement, weight_decay, grad_scale_ptr, seed_ptr, tensor, first_index,
                  MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                  FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, BLOCKS: tl.constexpr, ZERO_CODE: tl.constexpr,
                  BUCKET_SHIFT: tl.constexpr, BUCKET_OFFSET: tl.constexpr, NUM_BUCKETS: tl.constexpr):
    """One pass over BLOCKS blocks: decode the buffer (0 on a first step), apply the rule, store the params,
    requantize the new buffer (absmax, then codes)."""
    blocks = tl.arange(0, BLOCKS)
    param = _load_float(param_ptr, offsets, mask, tl.float32)
    grad = _load_float(grad_ptr, offsets, mask, tl.float32)
    if FIRST_STEP:
        buf = tl.zeros_like(param)  # stays 0 without MOMENTUM
    else:
        codes = tl.load(code_ptr + offsets, mask=mask)  # any byte is a valid index into qmap
        old_absmax = tl.load(absmax_ptr + blocks, mask=block_mask)
        buf = tl.load(qmap + codes.to(tl.int32)) * old_absmax[:, None]
    param, buf = sgd_rule(param, grad, buf, lr, momentum, dampening_complement, weight_decay, grad_scale_ptr,
                          MOMENTUM, MAXIMIZE, WEIGHT_DECAY, FIRST_STEP, NESTEROV)
    _store_param(param_ptr, offsets, param, mask, seed_ptr, tensor, first_index)
    absmax = _block_absmax(buf, mask)
    tl.store(absmax_ptr + blocks, absmax, mask=block_mask)
    codes = _quantize_tile(buf, absmax, bucket_table, ZERO_CODE, BUCKET_SHIFT, BUCKET_OFFSET, NUM_BUCKETS)
    tl.store(code_ptr + offsets, codes, mask=mask)


@triton.jit
def _sgd8bit_unit(entry, unit, tensor, qmap, bucket_table, lr, momentum, dampening_complement, weight_decay,
                  grad_scale_ptr, seed_ptr, STORAGE: tl.constexpr, MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr,
                  WEIGHT_DECAY: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
                  ALIGNED: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_SIZE: tl.constexpr, ZERO_CODE: tl.constexpr,
                  BUCKET_SHIFT: tl.constexpr, BUCKET_OFFSET: tl.constexpr, NUM_BUCKETS: tl.constexpr):
    """Updates blocks [unit * BLOCKS, (unit + 1) * BLOCKS) of the tensor (fewer at its end)."""
    param_ptr, code_ptr, absmax_ptr = _blockwise_pointers(entry, unit, STORAGE, ALIGNED, BLOCKS)
    grad_ptr = _typed_pointer(entry, GRAD, STORAGE, ALIGNED)
    if _whole_blocks(entry, unit, BLOCKS):
        start = unit * (BLOCKS * BLOCK_SIZE)
        _sgd8bit_tile(param_ptr + start, grad_ptr + start, code_ptr + start, absmax_ptr,
                      _regular_tile(BLOCKS, BLOCK_SIZE), None, None, qmap, bucket_table, lr, momentum,
                      dampening_complement, weight_decay, grad_scale_ptr, seed_ptr, tensor, start, MOMENTUM, MAXIMIZE,
                      WEIGHT_DECAY, FIRST_STEP, NESTEROV, BLOCKS, ZERO_CODE, BUCKET_SHIFT, BUCKET_OFFSET,
                      NUM_BUCKETS)
    else:
        start, offsets, mask, block_mask = _unit_tile(entry, unit, BLOCKS, BLOCK_SIZE)
        _sgd8bit_tile(param_ptr + start, grad_ptr + start, code_ptr + start, absmax_ptr, offsets, mask,
                      block_mask, qmap, bucket_table, lr, momentum, dampening_complement, weight_decay, grad_scale_ptr,
                      seed_ptr, tensor, start, MOMENTUM, MAXIMIZE, WEIGHT_DECAY, FIRST_STEP, NESTEROV, BLOCKS,
                      ZERO_CODE, BUCKET_SHIFT, BUCKET_OFFSET, NUM_BUCKETS)


@triton.jit
def sgd8bit_update_kernel(tensor_table, program_tensor, qmap, bucket_table, lr_ptr, momentum_ptr, constants_ptr,
                          grad_scale_ptr, found_inf_ptr, seed_ptr,
                          STORAGE: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                          FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr, ALIGNED: tl.constexpr,
                          BLOCKS: tl.constexpr, BLOCK_SIZE: tl.constexpr, ZERO_CODE: tl.constexpr,
                          BUCKET_SHIFT: tl.constexpr, BUCKET_OFFSET: tl.constexpr, NUM_BUCKETS: tl.constexpr):
    """sgd8bit_update over a list of tensors: each program updates BLOCKS consecutive blocks of one tensor. A
    momentum value of 0 leaves the decoded buffer (0 on a first step) as it is, to be requantized."""
    if _runs(found_inf_ptr):
        tensor, entry, unit = _program_unit(program_tensor, tensor_table)
        lr, momentum, momentum_is_nonzero, dampening_complement, weight_decay = _hyperparameters(
            lr_ptr, momentum_ptr, constants_ptr, tl.float32)
        if momentum_is_nonzero:
            _sgd8bit_unit(entry, unit, tensor, qmap, bucket_table, lr, momentum, dampening_complement, weight_decay,
                          grad_scale_ptr, seed_ptr, STORAGE, True, MAXIMIZE, WEIGHT_DECAY, FIRST_STEP, NESTEROV,
                          ALIGNED, BLOCKS, BLOCK_SIZE, ZERO_CODE, BUCKET_SHIFT, BUCKET_OFFSET, NUM_BUCKETS)
        else:
            _sgd8bit_unit(entry, unit, tensor, qmap, bucket_table, lr, momentum, dampening_complement, weight_decay,
                          grad_scale_ptr, seed_ptr, STORAGE, False, MAXIMIZE, WEIGHT_DECAY, FIRST_STEP, NESTEROV,
                          ALIGNED, BLOCKS, BLOCK_SIZE, ZERO_CODE, BUCKET_SHIFT, BUCKET_OFFSET, NUM_BUCKETS)


@triton.jit
def _quantize_unit(values_ptr, code_ptr, absmax_ptr, offsets, mask, block_mask, bucket_table,
                   BLOCKS: tl.constexpr, ZERO_CODE: tl.constexpr, BUCKET_SHIFT: tl.constexpr,
                   BUCKET_OFFSET: tl.constexpr, NUM_BUCKETS: tl.constexpr):
    values = _load_float(values_ptr, offsets, mask, tl.float32)  # float64 values round to float32 first
    absmax = _block_absmax(values, mask)
    tl.store(absmax_ptr + tl.arange(0, BLOCKS), absmax, mask=block_mask)
    codes = _quantize_tile(values, absmax, bucket_table, ZERO_CODE, BUCKET_SHIFT, BUCKET_OFFSET, NUM_BUCKETS)
    tl.store(code_ptr + offsets, codes, mask=mask)


@triton.jit
def quantize_blockwise_kernel(tensor_table, program_tensor, bucket_table,
                              STORAGE: tl.constexpr, ALIGNED: tl.constexpr, BLOCKS: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr, ZERO_CODE: tl.constexpr, BUCKET_SHIFT: tl.constexpr,
                              BUCKET_OFFSET: tl.constexpr, NUM_BUCKETS: tl.constexpr):
    """values -> codes, absmax; each program quantizes BLOCKS consecutive blocks."""
    tensor, entry, unit = _program_unit(program_tensor, tensor_table)
    values_ptr, code_ptr, absmax_ptr = _blockwise_pointers(entry, unit, STORAGE, ALIGNED, BLOCKS)
    if _whole_blocks(entry, unit, BLOCKS):
        start = unit * (BLOCKS * BLOCK_SIZE)
        _quantize_unit(values_ptr + start, code_ptr + start, absmax_ptr, _regular_tile(BLOCKS, BLOCK_SIZE), None,
                       None, bucket_table, BLOCKS, ZERO_CODE, BUCKET_SHIFT, BUCKET_OFFSET, NUM_BUCKETS)
    else:
        start, offsets, mask, block_mask = _unit_tile(entry, unit, BLOCKS, BLOCK_SIZE)
        _quantize_unit(values_ptr + start, code_ptr + start, absmax_ptr, offsets, mask, block_mask, bucket_table,
                       BLOCKS, ZERO_CODE, BUCKET_SHIFT, BUCKET_OFFSET, NUM_BUCKETS)


@triton.jit
def _dequantize_unit(code_ptr, absmax_ptr, out_ptr, offsets, mask, block_mask, qmap, BLOCKS: tl.constexpr):
    codes = tl.load(code_ptr + offsets, mask=mask)
    absmax = tl.load(absmax_ptr + tl.arange(0, BLOCKS), mask=block_mask)
    _store_float(out_ptr, offsets, tl.load(qmap + codes.to(tl.int32)) * absmax[:, None], mask)


@triton.jit
def dequantize_blockwise_kernel(tensor_table, program_tensor, qmap,
                                STORAGE: tl.constexpr, ALIGNED: tl.constexpr, BLOCKS: tl.constexpr,
                                BLOCK_SIZE: tl.constexpr):
    """(codes, absmax) -> out = qmap[code] * absmax (one float32 rounding), stored in out's dtype."""
    tensor, entry, unit = _program_unit(program_tensor, tensor_table)
    out_ptr, code_ptr, absmax_ptr = _blockwise_pointers(entry, unit, STORAGE, ALIGNED, BLOCKS)
    if _whole_blocks(entry, unit, BLOCKS):
        start = unit * (BLOCKS * BLOCK_SIZE)
        _dequantize_unit(code_ptr + start, absmax_ptr, out_ptr + start, _regular_tile(BLOCKS, BLOCK_SIZE), None,
                         None, qmap, BLOCKS)
    else:
        start, offsets, mask, block_mask = _unit_tile(entry, unit, BLOCKS, BLOCK_SIZE)
        _dequantize_unit(code_ptr + start, absmax_ptr, out_ptr + start, offsets, mask, block_mask, qmap, BLOCKS)
