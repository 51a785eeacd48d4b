// JPEG-style compression approximation (Das et al., SHIELD / Dziugaite et al.):
// per 8x8 block, BT.601 full-range YCbCr with level shift, orthonormal DCT-II,
// quantise with the IJG-scaled standard tables, dequantise, inverse DCT, back to
// RGB, round and clamp. No chroma subsampling and no entropy coding.
#include "pixel_math.cuh"

__constant__ int rs_luma_base[64] = RS_JPEG_LUMA_TABLE;
__constant__ int rs_chroma_base[64] = RS_JPEG_CHROMA_TABLE;

// One thread block of 8 x 8 threads per image block; grid (ceil(W / 8), ceil(H / 8)).
// Frames are HWC uint8 with 3 channels, BGR when `bgr` != 0 else RGB. src may equal
// dst: a block reads and writes only its own pixels (edge padding replicates pixels
// of the same block).
extern "C" __global__ void rs_jpeg_u8(const uint8_t* src, uint8_t* dst, int height, int width,
                                      size_t src_stride, size_t dst_stride, int quality,
                                      int bgr) {
  __shared__ float basis[64];
  __shared__ int q_luma[64];
  __shared__ int q_chroma[64];
  __shared__ float planes[3][64];
  __shared__ float tmp[3][64];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  if (tx >= 8 || ty >= 8) return;  // a wrong block shape must not index past the tiles
  const int lane = ty * 8 + tx;
  const int bx0 = blockIdx.x * 8;
  const int by0 = blockIdx.y * 8;
  basis[lane] = rs_dct_basis(ty, tx);  // [k = ty][n = tx]
  q_luma[lane] = rs_jpeg_scaled_q(rs_luma_base[lane], quality);
  q_chroma[lane] = rs_jpeg_scaled_q(rs_chroma_base[lane], quality);
  rs_jpeg_load(src, height, width, src_stride, bgr, bx0, by0, tx, ty, planes);
  __syncthreads();
  rs_jpeg_fdct_rows(basis, planes, tmp, tx, ty);
  __syncthreads();
  rs_jpeg_fdct_cols_quant(basis, tmp, planes, q_luma, q_chroma, tx, ty);
  __syncthreads();
  rs_jpeg_idct_cols(basis, planes, tmp, tx, ty);
  __syncthreads();
  rs_jpeg_store(basis, tmp, dst, height, width, dst_stride, bgr, bx0, by0, tx, ty);
}
