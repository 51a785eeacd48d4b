// Host (CPU) build of the shared per-pixel math in pixel_math.cuh, exported with a
// C ABI for kernels/host.py. Each function runs the same RS_HD code the CUDA
// kernels run, looping over what the GPU spreads over threads, so tests can check
// the kernels' arithmetic against NumPy on machines without a GPU.
// Return codes: 0 ok, -1 invalid argument.
#include "pixel_math.cuh"

#define RS_HOST_ABI_VERSION 2

static const int kLumaBase[64] = RS_JPEG_LUMA_TABLE;
static const int kChromaBase[64] = RS_JPEG_CHROMA_TABLE;

extern "C" {

int rs_host_abi_version(void) { return RS_HOST_ABI_VERSION; }

int rs_host_bitdepth(const uint8_t* src, uint8_t* dst, size_t n, int bits, int mode) {
  if (bits < 1 || bits > 8 || mode < 0 || mode > 1) return -1;
  if (n > 0 && (src == nullptr || dst == nullptr)) return -1;
  for (size_t i = 0; i < n; ++i) dst[i] = rs_bitdepth(src[i], bits, mode);
  return 0;
}

// The kernel's packed path: four bytes per 32-bit word.
int rs_host_bitdepth_packed(const uint32_t* src, uint32_t* dst, size_t n_words, int bits,
                            int mode) {
  if (bits < 1 || bits > 8 || mode < 0 || mode > 1) return -1;
  for (size_t i = 0; i < n_words; ++i) dst[i] = rs_bitdepth_word(src[i], bits, mode);
  return 0;
}

int rs_host_median(const uint8_t* src, uint8_t* dst, int height, int width, int channels,
                   int ksize) {
  if (height < 1 || width < 1 || channels < 1 || (ksize != 3 && ksize != 5)) return -1;
  const size_t stride = static_cast<size_t>(width) * channels;
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      for (int c = 0; c < channels; ++c) {
        const uint8_t v = ksize == 3
                              ? rs_median_at<3>(src, height, width, channels, stride, y, x, c)
                              : rs_median_at<5>(src, height, width, channels, stride, y, x, c);
        dst[static_cast<size_t>(y) * stride + static_cast<size_t>(x) * channels + c] = v;
      }
    }
  }
  return 0;
}

int rs_host_linear_taps(int n_src, int n_dst, int* i0, int* i1, float* w) {
  if (n_src < 1 || n_dst < 1) return -1;
  for (int d = 0; d < n_dst; ++d) rs_linear_tap(d, n_src, n_dst, &i0[d], &i1[d], &w[d]);
  return 0;
}

// ROI already clamped to the frame; out is float32 [3, size, size], RGB.
int rs_host_preprocess(const uint8_t* frame, int height, int width, size_t row_stride, int x0,
                       int y0, int x1, int y1, int size, float* out) {
  if (size < 1 || x0 < 0 || y0 < 0 || x1 > width || y1 > height || x1 <= x0 || y1 <= y0) {
    return -1;
  }
  const size_t plane = static_cast<size_t>(size) * size;
  for (int oy = 0; oy < size; ++oy) {
    for (int ox = 0; ox < size; ++ox) {
      float rgb[3];
      rs_preprocess_pixel(frame, row_stride, x0, y0, x1 - x0, y1 - y0, size, ox, oy, rgb);
      const size_t at = static_cast<size_t>(oy) * size + ox;
      for (int c = 0; c < 3; ++c) out[c * plane + at] = rgb[c];
    }
  }
  return 0;
}

int rs_host_jpeg_qtable(int quality, int chroma, int* out) {
  if (quality < 1 || quality > 100) return -1;
  for (int i = 0; i < 64; ++i) out[i] = rs_jpeg_scaled_q(chroma ? kChromaBase[i] : kLumaBase[i],
                                                         quality);
  return 0;
}

int rs_host_dct_basis(float* out) {
  for (int k = 0; k < 8; ++k)
    for (int n = 0; n < 8; ++n) out[k * 8 + n] = rs_dct_basis(k, n);
  return 0;
}

// Runs the kernel's five block stages lane by lane, in the kernel's order.
int rs_host_jpeg(const uint8_t* src, uint8_t* dst, int height, int width, int quality, int bgr) {
  if (height < 1 || width < 1 || quality < 1 || quality > 100) return -1;
  const size_t stride = static_cast<size_t>(width) * 3;
  float basis[64];
  int q_luma[64], q_chroma[64];
  rs_host_dct_basis(basis);
  rs_host_jpeg_qtable(quality, 0, q_luma);
  rs_host_jpeg_qtable(quality, 1, q_chroma);
  float planes[3][64], tmp[3][64];
  for (int by0 = 0; by0 < height; by0 += 8) {
    for (int bx0 = 0; bx0 < width; bx0 += 8) {
      for (int ty = 0; ty < 8; ++ty)
        for (int tx = 0; tx < 8; ++tx)
          rs_jpeg_load(src, height, width, stride, bgr, bx0, by0, tx, ty, planes);
      for (int ty = 0; ty < 8; ++ty)
        for (int tx = 0; tx < 8; ++tx) rs_jpeg_fdct_rows(basis, planes, tmp, tx, ty);
      for (int ty = 0; ty < 8; ++ty)
        for (int tx = 0; tx < 8; ++tx)
          rs_jpeg_fdct_cols_quant(basis, tmp, planes, q_luma, q_chroma, tx, ty);
      for (int ty = 0; ty < 8; ++ty)
        for (int tx = 0; tx < 8; ++tx) rs_jpeg_idct_cols(basis, planes, tmp, tx, ty);
      for (int ty = 0; ty < 8; ++ty)
        for (int tx = 0; tx < 8; ++tx)
          rs_jpeg_store(basis, tmp, dst, height, width, stride, bgr, bx0, by0, tx, ty);
    }
  }
  return 0;
}

}  // extern "C"
