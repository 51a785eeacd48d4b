// Fused ROI crop + half-pixel bilinear resize + BGR->RGB + /255 + HWC->NCHW.
// Writes float32 straight into a caller-provided device buffer (for example a
// TensorRT engine's input binding), so no intermediate image is materialised.
#include "pixel_math.cuh"

__device__ __forceinline__ void rs_preprocess_store(const uint8_t* frame, int height, int width,
                                                    size_t row_stride, int x0, int y0, int x1,
                                                    int y1, int size, float* out) {
  const int ox = blockIdx.x * blockDim.x + threadIdx.x;
  const int oy = blockIdx.y * blockDim.y + threadIdx.y;
  if (ox >= size || oy >= size) return;
  // Clamp again on the device: a bad box must not read outside the frame.
  x0 = rs_clamp_int(x0, 0, width);
  x1 = rs_clamp_int(x1, 0, width);
  y0 = rs_clamp_int(y0, 0, height);
  y1 = rs_clamp_int(y1, 0, height);
  const size_t plane = static_cast<size_t>(size) * size;
  const size_t at = static_cast<size_t>(oy) * size + ox;
  if (x1 <= x0 || y1 <= y0) {  // empty ROI: a defined (black) input rather than garbage
    out[at] = 0.0f;
    out[plane + at] = 0.0f;
    out[2 * plane + at] = 0.0f;
    return;
  }
  float rgb[3];
  rs_preprocess_pixel(frame, row_stride, x0, y0, x1 - x0, y1 - y0, size, ox, oy, rgb);
  out[at] = rgb[0];
  out[plane + at] = rgb[1];
  out[2 * plane + at] = rgb[2];
}

// One ROI (x1/y1 exclusive, clamped by the caller) into out[0:3*size*size].
// Block (16, 16), grid (ceil(size / 16), ceil(size / 16)).
extern "C" __global__ void rs_preprocess_roi(const uint8_t* __restrict__ frame, int height,
                                             int width, size_t row_stride, int x0, int y0,
                                             int x1, int y1, int size, float* __restrict__ out) {
  rs_preprocess_store(frame, height, width, row_stride, x0, y0, x1, y1, size, out);
}

// A batch of ROIs from one frame: `boxes` is int32 [n_rois, 4] in device memory and
// `out` float32 [n_rois, 3, size, size]. Grid z indexes the ROI.
extern "C" __global__ void rs_preprocess_rois(const uint8_t* __restrict__ frame, int height,
                                              int width, size_t row_stride,
                                              const int* __restrict__ boxes, int n_rois,
                                              int size, float* __restrict__ out) {
  const int roi = blockIdx.z;
  if (roi >= n_rois) return;
  const int* b = boxes + 4 * roi;
  float* dst = out + static_cast<size_t>(roi) * 3 * size * size;
  rs_preprocess_store(frame, height, width, row_stride, b[0], b[1], b[2], b[3], size, dst);
}
