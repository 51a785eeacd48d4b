// Median filter (cv2.medianBlur semantics: K x K window per channel, borders
// replicated) on HWC uint8 images with any channel count, K = 3 or 5.
#include "pixel_math.cuh"

#define RS_MEDIAN_TILE 16

// One thread per output pixel. The block first copies its (16 + K - 1)^2 x C tile
// into shared memory with clamped (replicated) source indices, so every window
// read afterwards is in bounds without further checks.
// Dynamic shared memory: (16 + K - 1)^2 * channels bytes.
template <int K>
__device__ void rs_median_tile(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst,
                               int height, int width, int channels, size_t src_stride,
                               size_t dst_stride) {
  extern __shared__ uint8_t tile[];
  const int r = K / 2;
  const int tw = RS_MEDIAN_TILE + K - 1;
  const int ox = blockIdx.x * RS_MEDIAN_TILE;
  const int oy = blockIdx.y * RS_MEDIAN_TILE;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  const int tile_bytes = tw * tw * channels;
  for (int i = tid; i < tile_bytes; i += nthreads) {
    const int c = i % channels;
    const int p = i / channels;
    const int yy = rs_clamp_int(oy + p / tw - r, 0, height - 1);
    const int xx = rs_clamp_int(ox + p % tw - r, 0, width - 1);
    tile[i] = src[static_cast<size_t>(yy) * src_stride + static_cast<size_t>(xx) * channels + c];
  }
  __syncthreads();
  const int x = ox + threadIdx.x;
  const int y = oy + threadIdx.y;
  if (x >= width || y >= height) return;
  const uint8_t* base = tile + (threadIdx.y * tw + threadIdx.x) * channels;
  uint8_t* out = dst + static_cast<size_t>(y) * dst_stride + static_cast<size_t>(x) * channels;
  for (int c = 0; c < channels; ++c) {
    out[c] = rs_median_window<K>(base + c, static_cast<ptrdiff_t>(tw) * channels, channels);
  }
}

// Launch with block (16, 16) and grid (ceil(W / 16), ceil(H / 16)); src != dst.
extern "C" __global__ void rs_median3_u8(const uint8_t* __restrict__ src,
                                         uint8_t* __restrict__ dst, int height, int width,
                                         int channels, size_t src_stride, size_t dst_stride) {
  rs_median_tile<3>(src, dst, height, width, channels, src_stride, dst_stride);
}

extern "C" __global__ void rs_median5_u8(const uint8_t* __restrict__ src,
                                         uint8_t* __restrict__ dst, int height, int width,
                                         int channels, size_t src_stride, size_t dst_stride) {
  rs_median_tile<5>(src, dst, height, width, channels, src_stride, dst_stride);
}
