// Per-pixel math shared by the CUDA kernels and the host library.
//
// Every function here is `RS_HD`: `__host__ __device__` under nvcc and plain
// `inline` under a C++ compiler, so the same lines run on the GPU and, through
// host_math.cpp, on the CPU where tests compare them with NumPy references.
// Images are HWC uint8 with an explicit row stride in bytes; indices are
// clamped (BORDER_REPLICATE) so no read leaves the image.
#ifndef ROADSHIELD_PIXEL_MATH_CUH
#define ROADSHIELD_PIXEL_MATH_CUH

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define RS_HD __host__ __device__ __forceinline__
#else
#define RS_HD inline
#endif

#define RS_PI 3.14159265358979323846

// ---------------------------------------------------------------- helpers

RS_HD int rs_clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

RS_HD float rs_clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Round half to even (np.round, rintf) and saturate to [0, 255].
RS_HD uint8_t rs_to_u8(float v) {
  return static_cast<uint8_t>(rs_clampf(rintf(v), 0.0f, 255.0f));
}

// ---------------------------------------------------------------- bit depth

// Two rules, as in kernels/sanitize_reference.py (bits in 1..8, L = 2^bits - 1):
//   truncate (mode 0): y = (x >> (8 - bits)) << (8 - bits)
//   round    (mode 1): q = (2 x L + 255) / 510, y = (2 q 255 + L) / (2 L)   (integer division;
//                      round(x L / 255) then round(q 255 / L), never a tie)
#define RS_BITDEPTH_TRUNCATE 0
#define RS_BITDEPTH_ROUND 1

RS_HD uint8_t rs_bitdepth_truncate(uint8_t x, int bits) {
  const int shift = 8 - rs_clamp_int(bits, 1, 8);
  return static_cast<uint8_t>((x >> shift) << shift);
}

RS_HD uint8_t rs_bitdepth_round(uint8_t x, int bits) {
  const int levels = (1 << rs_clamp_int(bits, 1, 8)) - 1;
  const int q = (2 * x * levels + 255) / 510;
  return static_cast<uint8_t>((2 * q * 255 + levels) / (2 * levels));
}

RS_HD uint8_t rs_bitdepth(uint8_t x, int bits, int mode) {
  return mode == RS_BITDEPTH_ROUND ? rs_bitdepth_round(x, bits) : rs_bitdepth_truncate(x, bits);
}

// Truncation as a byte mask replicated over a 32-bit word: four packed bytes, one AND.
RS_HD uint32_t rs_bitdepth_mask32(int bits) {
  const int shift = 8 - rs_clamp_int(bits, 1, 8);
  const uint32_t byte_mask = (0xFFu << shift) & 0xFFu;
  return byte_mask * 0x01010101u;
}

// Four packed bytes: the mask for truncation, byte by byte for rounding.
RS_HD uint32_t rs_bitdepth_word(uint32_t w, int bits, int mode) {
  if (mode != RS_BITDEPTH_ROUND) return w & rs_bitdepth_mask32(bits);
  uint32_t out = 0;
  for (int i = 0; i < 4; ++i) {
    const uint8_t b = static_cast<uint8_t>(w >> (8 * i));
    out |= static_cast<uint32_t>(rs_bitdepth_round(b, bits)) << (8 * i);
  }
  return out;
}

// ---------------------------------------------------------------- median

// Sort N values with an odd-even transposition network (N passes). The loops
// have compile-time bounds, so nvcc unrolls them and keeps `v` in registers.
template <int N>
RS_HD void rs_sort_network(uint8_t (&v)[N]) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int pass = 0; pass < N; ++pass) {
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int i = pass & 1; i + 1 < N; i += 2) {
      const uint8_t a = v[i];
      const uint8_t b = v[i + 1];
      v[i] = a < b ? a : b;
      v[i + 1] = a < b ? b : a;
    }
  }
}

// Median of a K x K window whose top-left value is at `base`; `row_step` and
// `col_step` are in bytes. The caller guarantees all K*K reads are in bounds.
template <int K>
RS_HD uint8_t rs_median_window(const uint8_t* base, ptrdiff_t row_step, ptrdiff_t col_step) {
  uint8_t v[K * K];
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int dy = 0; dy < K; ++dy) {
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int dx = 0; dx < K; ++dx) v[dy * K + dx] = base[dy * row_step + dx * col_step];
  }
  rs_sort_network<K * K>(v);
  return v[(K * K) / 2];
}

// Median of channel `ch` at (y, x) over a K x K window, borders replicated
// (cv2.medianBlur semantics). Reads straight from the image with clamped indices.
template <int K>
RS_HD uint8_t rs_median_at(const uint8_t* src, int height, int width, int channels,
                           size_t row_stride, int y, int x, int ch) {
  const int r = K / 2;
  uint8_t v[K * K];
  for (int dy = 0; dy < K; ++dy) {
    const int yy = rs_clamp_int(y + dy - r, 0, height - 1);
    const uint8_t* row = src + static_cast<size_t>(yy) * row_stride;
    for (int dx = 0; dx < K; ++dx) {
      const int xx = rs_clamp_int(x + dx - r, 0, width - 1);
      v[dy * K + dx] = row[static_cast<size_t>(xx) * channels + ch];
    }
  }
  rs_sort_network<K * K>(v);
  return v[(K * K) / 2];
}

// ---------------------------------------------------------------- bilinear resize

// One output index `d` of a half-pixel-centre bilinear resize (OpenCV INTER_LINEAR):
// s = clip((d + 0.5) * n_src / n_dst - 0.5, 0, n_src - 1); taps i0 = floor(s),
// i1 = min(i0 + 1, n_src - 1); `w` is the weight of i1.
RS_HD void rs_linear_tap(int d, int n_src, int n_dst, int* i0, int* i1, float* w) {
  const float scale = static_cast<float>(n_src) / static_cast<float>(n_dst);
  float s = (static_cast<float>(d) + 0.5f) * scale - 0.5f;
  s = rs_clampf(s, 0.0f, static_cast<float>(n_src - 1));
  const int lo = rs_clamp_int(static_cast<int>(floorf(s)), 0, n_src - 1);
  *i0 = lo;
  *i1 = lo + 1 < n_src ? lo + 1 : n_src - 1;
  *w = s - static_cast<float>(lo);
}

// Output pixel (ox, oy) of the fused preprocess: crop the ROI [x0, x0 + roi_w) x
// [y0, y0 + roi_h) of a BGR HWC uint8 frame, resize it to size x size, and return
// RGB in [0, 1]. The ROI must lie inside the frame (the caller clamps it).
RS_HD void rs_preprocess_pixel(const uint8_t* frame, size_t row_stride, int x0, int y0,
                               int roi_w, int roi_h, int size, int ox, int oy, float rgb[3]) {
  int yi0, yi1, xi0, xi1;
  float wy, wx;
  rs_linear_tap(oy, roi_h, size, &yi0, &yi1, &wy);
  rs_linear_tap(ox, roi_w, size, &xi0, &xi1, &wx);
  const uint8_t* r0 = frame + static_cast<size_t>(y0 + yi0) * row_stride;
  const uint8_t* r1 = frame + static_cast<size_t>(y0 + yi1) * row_stride;
  const size_t c0 = static_cast<size_t>(x0 + xi0) * 3;
  const size_t c1 = static_cast<size_t>(x0 + xi1) * 3;
  for (int c = 0; c < 3; ++c) {
    // Rows first, then columns, as in kernels/reference.py.
    const float left = r0[c0 + c] * (1.0f - wy) + r1[c0 + c] * wy;
    const float right = r0[c1 + c] * (1.0f - wy) + r1[c1 + c] * wy;
    const float v = left * (1.0f - wx) + right * wx;
    rgb[2 - c] = v / 255.0f;  // BGR -> RGB
  }
}

// ---------------------------------------------------------------- JPEG approximation

// Standard JPEG tables (ITU-T T.81 Annex K.1), row-major over (v, u).
#define RS_JPEG_LUMA_TABLE                                                               \
  {16, 11, 10, 16, 24,  40,  51,  61,  12, 12, 14, 19, 26,  58,  60,  55,              \
   14, 13, 16, 24, 40,  57,  69,  56,  14, 17, 22, 29, 51,  87,  80,  62,              \
   18, 22, 37, 56, 68,  109, 103, 77,  24, 35, 55, 64, 81,  104, 113, 92,              \
   49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99}
#define RS_JPEG_CHROMA_TABLE                                                             \
  {17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,                     \
   24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,                     \
   99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,                     \
   99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99}

// IJG quality scaling (jcparam.c): quality 1..100 -> percentage, then
// q = (base * scale + 50) / 100 clamped to [1, 255].
RS_HD int rs_jpeg_scaled_q(int base, int quality) {
  const int qual = rs_clamp_int(quality, 1, 100);
  const int scale = qual < 50 ? 5000 / qual : 200 - 2 * qual;
  return rs_clamp_int((base * scale + 50) / 100, 1, 255);
}

// Orthonormal 8-point DCT-II basis: c(k) * cos((2n + 1) k pi / 16), c(0) = sqrt(1/8),
// c(k > 0) = sqrt(2/8). Computed in double so host and device agree to the float.
RS_HD float rs_dct_basis(int k, int n) {
  const double ck = k == 0 ? 0.35355339059327373 : 0.5;
  return static_cast<float>(ck * cos((2.0 * n + 1.0) * k * RS_PI / 16.0));
}

// BT.601 full-range RGB -> YCbCr with the JPEG level shift (all three minus 128).
RS_HD void rs_rgb_to_ycc(float r, float g, float b, float ycc[3]) {
  ycc[0] = 0.299f * r + 0.587f * g + 0.114f * b - 128.0f;
  ycc[1] = -0.168735892f * r - 0.331264108f * g + 0.5f * b;
  ycc[2] = 0.5f * r - 0.418687589f * g - 0.081312411f * b;
}

// Inverse of rs_rgb_to_ycc (level shift undone), unrounded.
RS_HD void rs_ycc_to_rgb(const float ycc[3], float rgb[3]) {
  const float y = ycc[0] + 128.0f;
  rgb[0] = y + 1.402f * ycc[2];
  rgb[1] = y - 0.344136286f * ycc[1] - 0.714136286f * ycc[2];
  rgb[2] = y + 1.772f * ycc[1];
}

// Round a coefficient to its quantisation step and back: rint(c / q) * q.
RS_HD float rs_quantize(float coef, int q) {
  const float qf = static_cast<float>(q);
  return rintf(coef / qf) * qf;
}

// The block pipeline below is written per "lane" (tx, ty) in 0..7 so the kernel
// runs one lane per thread between __syncthreads() and the host runs the lanes
// in loops; both execute the same arithmetic in the same order. Buffers are
// [3][64] planes indexed [row * 8 + col]; `basis` is [k * 8 + n].

// Stage 1: load pixel (tx, ty) of the block at (bx0, by0) with edges replicated
// (as libjpeg pads partial blocks) and convert it to level-shifted YCbCr.
RS_HD void rs_jpeg_load(const uint8_t* src, int height, int width, size_t row_stride,
                        int bgr, int bx0, int by0, int tx, int ty, float planes[3][64]) {
  const int x = rs_clamp_int(bx0 + tx, 0, width - 1);
  const int y = rs_clamp_int(by0 + ty, 0, height - 1);
  const uint8_t* p = src + static_cast<size_t>(y) * row_stride + static_cast<size_t>(x) * 3;
  const float r = bgr ? p[2] : p[0];
  const float b = bgr ? p[0] : p[2];
  float ycc[3];
  rs_rgb_to_ycc(r, static_cast<float>(p[1]), b, ycc);
  for (int c = 0; c < 3; ++c) planes[c][ty * 8 + tx] = ycc[c];
}

// Stage 2: 1-D DCT along each row: tmp[c][ty][tx] = sum_n basis[tx][n] * planes[c][ty][n].
RS_HD void rs_jpeg_fdct_rows(const float* basis, const float planes[3][64], float tmp[3][64],
                             int tx, int ty) {
  for (int c = 0; c < 3; ++c) {
    float acc = 0.0f;
    for (int n = 0; n < 8; ++n) acc += basis[tx * 8 + n] * planes[c][ty * 8 + n];
    tmp[c][ty * 8 + tx] = acc;
  }
}

// Stage 3: 1-D DCT down each column, then quantise/dequantise coefficient (v=ty, u=tx).
RS_HD void rs_jpeg_fdct_cols_quant(const float* basis, const float tmp[3][64],
                                   float planes[3][64], const int* q_luma,
                                   const int* q_chroma, int tx, int ty) {
  for (int c = 0; c < 3; ++c) {
    float acc = 0.0f;
    for (int n = 0; n < 8; ++n) acc += basis[ty * 8 + n] * tmp[c][n * 8 + tx];
    const int q = c == 0 ? q_luma[ty * 8 + tx] : q_chroma[ty * 8 + tx];
    planes[c][ty * 8 + tx] = rs_quantize(acc, q);
  }
}

// Stage 4: inverse 1-D DCT down each column: tmp[c][y=ty][u=tx] = sum_v basis[v][ty] * X[v][tx].
RS_HD void rs_jpeg_idct_cols(const float* basis, const float planes[3][64], float tmp[3][64],
                             int tx, int ty) {
  for (int c = 0; c < 3; ++c) {
    float acc = 0.0f;
    for (int v = 0; v < 8; ++v) acc += basis[v * 8 + ty] * planes[c][v * 8 + tx];
    tmp[c][ty * 8 + tx] = acc;
  }
}

// Stage 5: inverse 1-D DCT along each row for pixel (tx, ty), back to RGB, rounded,
// clamped and written if it lies inside the image.
RS_HD void rs_jpeg_store(const float* basis, const float tmp[3][64], uint8_t* dst, int height,
                         int width, size_t row_stride, int bgr, int bx0, int by0, int tx,
                         int ty) {
  float ycc[3];
  for (int c = 0; c < 3; ++c) {
    float acc = 0.0f;
    for (int u = 0; u < 8; ++u) acc += basis[u * 8 + tx] * tmp[c][ty * 8 + u];
    ycc[c] = acc;
  }
  const int x = bx0 + tx;
  const int y = by0 + ty;
  if (x < 0 || y < 0 || x >= width || y >= height) return;
  float rgb[3];
  rs_ycc_to_rgb(ycc, rgb);
  uint8_t* p = dst + static_cast<size_t>(y) * row_stride + static_cast<size_t>(x) * 3;
  p[bgr ? 2 : 0] = rs_to_u8(rgb[0]);
  p[1] = rs_to_u8(rgb[1]);
  p[bgr ? 0 : 2] = rs_to_u8(rgb[2]);
}

#endif  // ROADSHIELD_PIXEL_MATH_CUH
