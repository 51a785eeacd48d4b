// Bit-depth reduction (Xu et al., feature squeezing) of every byte of a uint8 buffer
// (HWC frames, batches) seen as a flat array of `n` bytes. `mode` 0 truncates
// (y = (x >> (8 - bits)) << (8 - bits)), 1 rounds to 2^bits - 1 levels; see pixel_math.cuh.
#include "pixel_math.cuh"

// 16 bytes per thread when both pointers are 16-byte aligned (one uint4 load and
// store, four 32-bit words), one byte per thread otherwise and for the tail. Grid-stride loops, so any grid size covers any `n`.
extern "C" __global__ void rs_bitdepth_u8(const uint8_t* __restrict__ src,
                                          uint8_t* __restrict__ dst, size_t n, int bits,
                                          int mode) {
  const size_t tid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t step = static_cast<size_t>(gridDim.x) * blockDim.x;
  const bool aligned = ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) &
                        15u) == 0;
  size_t head = 0;
  if (aligned) {
    const size_t words = n / 16;
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    for (size_t i = tid; i < words; i += step) {
      uint4 v = s4[i];
      v.x = rs_bitdepth_word(v.x, bits, mode);
      v.y = rs_bitdepth_word(v.y, bits, mode);
      v.z = rs_bitdepth_word(v.z, bits, mode);
      v.w = rs_bitdepth_word(v.w, bits, mode);
      d4[i] = v;
    }
    head = words * 16;
  }
  for (size_t i = head + tid; i < n; i += step) dst[i] = rs_bitdepth(src[i], bits, mode);
}
