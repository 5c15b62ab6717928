// Mixed-precision linear for gift checkpoints:
//   y = x @ dequant(qweight)^T + x[:, salient_idx] @ salient_weight^T (+ bias)
//
// Weight layout (GPTQ, see gift_quant/core/packing.py): qweight int32 [chunks*BITS, N]; a chunk of 32 input
// rows packs into BITS words per output column, LSB first (3-bit codes span words). dequant = s*(c - z)
// with s = scales[g, n], z = zeros[g, n], g = gidx[row].
//
// The Python side prepares, once per layer and device (kernels/prepare.py):
//   perm  int32 [chunks*32]  original input index of each packed row, -1 for padding rows;
//   gidx  int32 [chunks*32]  group of each packed row (non-decreasing when possible);
//   zeros uint8 [G, N]       unpacked zero-points.
// Salient rows of the packed base either hold the zero-point (dequantize to 0) or were removed by
// the prepare step, so they never count twice.
//
// Two paths, dispatched on the token count M:
//   gemv_kernel    M <= GIFT_QUANT_GEMV_MAX_TOKENS (default 4; decode), at most 8 per launch. Each thread
//                  owns 4 adjacent output columns and reads 16-byte words straight from the packed
//                  layout (coalesced across the warp). The input rows are split across blockIdx.y
//                  (split-K) so that narrow layers still fill the GPU; partial sums meet in an fp32
//                  buffer through atomicAdd. Per group the scale is factored out:
//                  sum_r s(c_r - z)x_r = s(sum_r c_r x_r - z sum_r x_r), one FMA per code.
//   dequant_kernel larger M (prefill): writes the effective fp16/bf16 weight W^T [K, N] (base and salient
//                  columns) and hands it to cuBLAS through at::mm.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>
#include <cstdint>

namespace {

constexpr int kThreads = 128;
constexpr int kVec = 4;                       // output columns per thread
constexpr int kColsPerBlock = kThreads * kVec;
constexpr int kMaxTokens = 8;                 // tokens per gemv launch
constexpr int kSmemBudget = 40 * 1024;        // dynamic shared memory per block, bytes

__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Code j (0..31) of a chunk held in BITS words. With j a compile-time constant (unrolled loops) the
// word index and shifts fold away and w stays in registers.
template <int BITS>
__device__ __forceinline__ uint32_t code_at(const uint32_t (&w)[BITS], int j) {
  const int bit = j * BITS;
  const int wi = bit >> 5;
  const int sh = bit & 31;
  uint32_t v = w[wi] >> sh;
  if (sh + BITS > 32) v |= w[(wi + 1 < BITS) ? wi + 1 : wi] << (32 - sh);
  return v & ((1u << BITS) - 1u);
}

// Exact int -> float for codes < 2^23 without the slow I2F unit: OR the code into the mantissa of
// 2^23 and subtract 2^23 (one LOP3 + one FADD at full rate).
__device__ __forceinline__ float code_to_float(uint32_t c) {
  return __int_as_float(0x4B000000u | c) - 8388608.0f;
}

template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&out)[kVec]) {
  // 4 x 16-bit = 8 bytes, aligned because N % 4 == 0 and col % 4 == 0
  const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
  const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int v = 0; v < kVec; ++v) out[v] = to_f(h[v]);
}

template <typename T, int BITS, int MT>
__global__ void __launch_bounds__(kThreads) gemv_kernel(
    const T* __restrict__ x, int64_t x_stride, int M,
    const int32_t* __restrict__ qw, const int32_t* __restrict__ perm, const int32_t* __restrict__ gidx,
    const T* __restrict__ scales, const uint8_t* __restrict__ zeros,
    const T* __restrict__ sal_w, const int32_t* __restrict__ sal_idx, int k,
    const T* __restrict__ bias, float* __restrict__ out,
    int N, int chunks, int chunks_per_split, int sal_per_split, int chunk_uniform) {
  extern __shared__ float smem[];
  const int ld = chunks_per_split * 32 + sal_per_split;  // per-token stride in smem
  float* xs = smem;                                        // [MT][ld] activations as float
  float* xcs = smem + MT * ld;                             // [MT][chunks_per_split] per-chunk sums of x
  int* gs = reinterpret_cast<int*>(xcs + MT * chunks_per_split);  // [chunks_per_split*32] groups

  const int split = blockIdx.y;
  const int c0 = split * chunks_per_split;
  const int c1 = min(c0 + chunks_per_split, chunks);
  const int rows = c1 > c0 ? (c1 - c0) * 32 : 0;
  const int s0 = split * sal_per_split;
  const int s1 = min(s0 + sal_per_split, k);
  const int srows = s1 > s0 ? s1 - s0 : 0;

  // stage this split's activations (gathered through perm) and groups
  for (int i = threadIdx.x; i < rows; i += kThreads) {
    const int p = perm[c0 * 32 + i];
    gs[i] = gidx[c0 * 32 + i];
#pragma unroll
    for (int m = 0; m < MT; ++m)
      xs[m * ld + i] = (p >= 0 && m < M) ? to_f(x[m * x_stride + p]) : 0.f;
  }
  for (int i = threadIdx.x; i < srows; i += kThreads) {
    const int p = sal_idx[s0 + i];
#pragma unroll
    for (int m = 0; m < MT; ++m)
      xs[m * ld + chunks_per_split * 32 + i] = (m < M) ? to_f(x[m * x_stride + p]) : 0.f;
  }
  __syncthreads();
  const int nc = rows / 32;
  for (int t = threadIdx.x; t < MT * nc; t += kThreads) {
    const int m = t / nc, cl = t % nc;
    float sum = 0.f;
    for (int j = 0; j < 32; ++j) sum += xs[m * ld + cl * 32 + j];
    xcs[m * chunks_per_split + cl] = sum;
  }
  __syncthreads();

  const int col = (blockIdx.x * kThreads + threadIdx.x) * kVec;
  if (col >= N) return;  // no barrier below

  float acc[MT][kVec], part[MT][kVec], xsum[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    xsum[m] = 0.f;
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[m][v] = part[m][v] = 0.f;
  }
  int cur_g = -1;

  auto flush = [&](int g) {
    float s[kVec];
    load4<T>(scales + (size_t)g * N + col, s);
    const uint32_t zraw = __ldg(reinterpret_cast<const uint32_t*>(zeros + (size_t)g * N + col));
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const float z = (float)((zraw >> (8 * v)) & 0xFFu);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        acc[m][v] = fmaf(s[v], part[m][v] - z * xsum[m], acc[m][v]);
        part[m][v] = 0.f;
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) xsum[m] = 0.f;
  };

  for (int c = c0; c < c1; ++c) {
    uint32_t w[kVec][BITS];
#pragma unroll
    for (int b = 0; b < BITS; ++b) {
      const int4 q = __ldg(reinterpret_cast<const int4*>(qw + (size_t)(c * BITS + b) * N + col));
      w[0][b] = (uint32_t)q.x;
      w[1][b] = (uint32_t)q.y;
      w[2][b] = (uint32_t)q.z;
      w[3][b] = (uint32_t)q.w;
    }
    const int lb = (c - c0) * 32;
    if (chunk_uniform) {
      // one group per 32-row chunk (no act-order, group size a multiple of 32): check it once
      const int g = gs[lb];
      if (g != cur_g) {
        if (cur_g >= 0) flush(cur_g);
        cur_g = g;
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) xsum[m] += xcs[m * chunks_per_split + (c - c0)];
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        float xv[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) xv[m] = xs[m * ld + lb + j];
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          const float f = code_to_float(code_at<BITS>(w[v], j));
#pragma unroll
          for (int m = 0; m < MT; ++m) part[m][v] = fmaf(f, xv[m], part[m][v]);
        }
      }
    } else {
      // groups may change inside a chunk: the (uniform) check runs per row
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int g = gs[lb + j];
        if (g != cur_g) {
          if (cur_g >= 0) flush(cur_g);
          cur_g = g;
        }
        float xv[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          xv[m] = xs[m * ld + lb + j];
          xsum[m] += xv[m];
        }
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          const float f = code_to_float(code_at<BITS>(w[v], j));
#pragma unroll
          for (int m = 0; m < MT; ++m) part[m][v] = fmaf(f, xv[m], part[m][v]);
        }
      }
    }
  }
  if (cur_g >= 0) flush(cur_g);

  // salient columns: FP16 weights [N, k], rows s0..s1 of this split
  for (int i = 0; i < srows; ++i) {
    const int j = s0 + i;
    float wv[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) wv[v] = to_f(sal_w[(size_t)(col + v) * k + j]);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float xv = xs[m * ld + chunks_per_split * 32 + i];
#pragma unroll
      for (int v = 0; v < kVec; ++v) acc[m][v] = fmaf(wv[v], xv, acc[m][v]);
    }
  }

  if (bias != nullptr && split == 0) {
    float b[kVec];
    load4<T>(bias + col, b);
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int v = 0; v < kVec; ++v) acc[m][v] += b[v];
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m >= M) break;
#pragma unroll
    for (int v = 0; v < kVec; ++v) atomicAdd(out + (size_t)m * N + col + v, acc[m][v]);
  }
}

// Effective weight transposed, W^T [K, N]: one thread per output column, blockIdx.y a packed chunk
// (or, past the last chunk, 32 salient rows). Every row of W^T is written exactly once: salient and
// padding rows carry perm = -1 in the packed part.
template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads) dequant_kernel(
    const int32_t* __restrict__ qw, const int32_t* __restrict__ perm, const int32_t* __restrict__ gidx,
    const T* __restrict__ scales, const uint8_t* __restrict__ zeros,
    const T* __restrict__ sal_w, const int32_t* __restrict__ sal_idx, int k,
    T* __restrict__ wt, int N, int chunks) {
  const int col = blockIdx.x * kThreads + threadIdx.x;
  if (col >= N) return;
  const int c = blockIdx.y;
  if (c < chunks) {
    uint32_t w[BITS];
#pragma unroll
    for (int b = 0; b < BITS; ++b) w[b] = (uint32_t)__ldg(qw + (size_t)(c * BITS + b) * N + col);
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int p = perm[c * 32 + j];
      if (p < 0) continue;
      const int g = gidx[c * 32 + j];
      const float s = to_f(scales[(size_t)g * N + col]);
      const float z = (float)zeros[(size_t)g * N + col];
      // (c - z) * s is exact in fp32 for 16-bit s, so this rounds once, like the PyTorch path
      wt[(size_t)p * N + col] = from_f<T>((code_to_float(code_at<BITS>(w, j)) - z) * s);
    }
  } else {
    const int i1 = min(k, (c - chunks + 1) * 32);
    for (int i = (c - chunks) * 32; i < i1; ++i) wt[(size_t)sal_idx[i] * N + col] = sal_w[(size_t)col * k + i];
  }
}

int sm_count(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cached[device] = n > 0 ? n : 1;
  }
  return cached[device];
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned(const torch::Tensor& t, int bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

void check_weights(at::ScalarType dtype, const torch::Tensor& qw, const torch::Tensor& perm,
                   const torch::Tensor& gidx, const torch::Tensor& scales, const torch::Tensor& zeros,
                   const torch::Tensor& sal_w, const torch::Tensor& sal_idx, int64_t bits, int64_t N) {
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "activations must be fp16 or bf16");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  TORCH_CHECK(qw.is_cuda() && qw.scalar_type() == at::kInt && qw.dim() == 2 && qw.is_contiguous() &&
                  qw.size(0) % bits == 0 && qw.size(1) == N && aligned(qw, 16),
              "qweight must be contiguous, 16-byte aligned int32 [chunks*bits, N]");
  const int64_t rows = qw.size(0) / bits * 32;
  TORCH_CHECK(perm.scalar_type() == at::kInt && perm.is_contiguous() && perm.numel() == rows, "perm shape");
  TORCH_CHECK(gidx.scalar_type() == at::kInt && gidx.is_contiguous() && gidx.numel() == rows, "gidx shape");
  TORCH_CHECK(scales.scalar_type() == dtype && scales.dim() == 2 && scales.is_contiguous() && scales.size(1) == N &&
                  aligned(scales, 8),
              "scales must be contiguous [G, N] in the activation dtype");
  TORCH_CHECK(zeros.scalar_type() == at::kByte && zeros.is_contiguous() && zeros.sizes() == scales.sizes() &&
                  aligned(zeros, 4),
              "zeros must be contiguous uint8 [G, N]");
  TORCH_CHECK(sal_w.scalar_type() == dtype && sal_w.dim() == 2 && sal_w.is_contiguous() && sal_w.size(0) == N,
              "salient_weight must be contiguous [N, k] in the activation dtype");
  TORCH_CHECK(sal_idx.scalar_type() == at::kInt && sal_idx.is_contiguous() && sal_idx.numel() == sal_w.size(1),
              "salient_idx shape");
  TORCH_CHECK(N < (1LL << 31) && rows < (1LL << 31), "layer too large");
}

template <typename T, int BITS, int MT>
void launch_gemv(const torch::Tensor& x2d, int64_t m0, int M, const torch::Tensor& qw, const torch::Tensor& perm,
                 const torch::Tensor& gidx, const torch::Tensor& scales, const torch::Tensor& zeros,
                 const torch::Tensor& sal_w, const torch::Tensor& sal_idx, const c10::optional<torch::Tensor>& bias,
                 torch::Tensor& out, int N, int chunks, int chunk_uniform, cudaStream_t stream) {
  const int k = (int)sal_w.size(1);
  const int col_blocks = (int)ceil_div(N, kColsPerBlock);
  const int target_blocks = 4 * sm_count(x2d.get_device());
  int64_t splits = std::max<int64_t>(1, ceil_div(target_blocks, col_blocks));
  splits = std::min<int64_t>(splits, std::max(chunks, 1));
  // shared memory per packed chunk: 32*MT floats + MT chunk sums + 32 ints; per salient row: MT floats
  const int64_t max_cps = std::max<int64_t>(1, kSmemBudget / 2 / ((32 * (MT + 1) + MT) * 4));
  int64_t cps = chunks > 0 ? ceil_div(chunks, splits) : 0;
  if (cps > max_cps) cps = max_cps;
  if (cps > 0) splits = ceil_div(chunks, cps);
  const int64_t max_sps = std::max<int64_t>(1, kSmemBudget / 2 / (MT * 4));
  if (k > 0 && ceil_div(k, splits) > max_sps) {
    splits = ceil_div(k, max_sps);
    if (chunks > 0) cps = ceil_div(chunks, splits);
  }
  const int64_t sps = k > 0 ? ceil_div(k, splits) : 0;
  TORCH_CHECK(splits <= 65535, "layer too large for the gemv grid");
  const size_t smem = (size_t)((cps * 32 + sps) * MT + cps * MT + cps * 32) * sizeof(float);
  const dim3 grid(col_blocks, (unsigned)splits);
  const T* xp = reinterpret_cast<const T*>(x2d.data_ptr()) + m0 * x2d.stride(0);
  gemv_kernel<T, BITS, MT><<<grid, kThreads, smem, stream>>>(
      xp, x2d.stride(0), M, qw.data_ptr<int32_t>(), perm.data_ptr<int32_t>(), gidx.data_ptr<int32_t>(),
      reinterpret_cast<const T*>(scales.data_ptr()), zeros.data_ptr<uint8_t>(),
      reinterpret_cast<const T*>(sal_w.data_ptr()), sal_idx.data_ptr<int32_t>(), k,
      bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr,
      out.data_ptr<float>() + m0 * N, N, chunks, (int)cps, (int)sps, chunk_uniform);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int BITS>
void gemv_bits(const torch::Tensor& x2d, const torch::Tensor& qw, const torch::Tensor& perm,
               const torch::Tensor& gidx, const torch::Tensor& scales, const torch::Tensor& zeros,
               const torch::Tensor& sal_w, const torch::Tensor& sal_idx, const c10::optional<torch::Tensor>& bias,
               torch::Tensor& out, int N, int chunks, int chunk_uniform, cudaStream_t stream) {
  const int64_t M = x2d.size(0);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxTokens) {
    const int mt = (int)std::min<int64_t>(kMaxTokens, M - m0);
#define GIFT_GEMV(MT_) \
  launch_gemv<T, BITS, MT_>(x2d, m0, mt, qw, perm, gidx, scales, zeros, sal_w, sal_idx, bias, out, N, chunks, chunk_uniform, \
                            stream)
    if (mt == 1) GIFT_GEMV(1);
    else if (mt == 2) GIFT_GEMV(2);
    else if (mt <= 4) GIFT_GEMV(4);
    else GIFT_GEMV(8);
#undef GIFT_GEMV
  }
}

template <typename T, int BITS>
void dequant_bits(const torch::Tensor& qw, const torch::Tensor& perm, const torch::Tensor& gidx,
                  const torch::Tensor& scales, const torch::Tensor& zeros, const torch::Tensor& sal_w,
                  const torch::Tensor& sal_idx, torch::Tensor& wt, int N, int chunks,
                  cudaStream_t stream) {
  const int k = (int)sal_w.size(1);
  const dim3 grid((unsigned)ceil_div(N, kThreads), (unsigned)(chunks + ceil_div(k, 32)));
  if (grid.y == 0) return;
  dequant_kernel<T, BITS><<<grid, kThreads, 0, stream>>>(
      qw.data_ptr<int32_t>(), perm.data_ptr<int32_t>(), gidx.data_ptr<int32_t>(),
      reinterpret_cast<const T*>(scales.data_ptr()), zeros.data_ptr<uint8_t>(),
      reinterpret_cast<const T*>(sal_w.data_ptr()), sal_idx.data_ptr<int32_t>(), k,
      reinterpret_cast<T*>(wt.data_ptr()), N, chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void gemv_dispatch(const torch::Tensor& x2d, const torch::Tensor& qw, const torch::Tensor& perm,
                   const torch::Tensor& gidx, const torch::Tensor& scales, const torch::Tensor& zeros,
                   const torch::Tensor& sal_w, const torch::Tensor& sal_idx,
                   const c10::optional<torch::Tensor>& bias, torch::Tensor& out, int64_t bits, int N, int chunks,
                   int cu, cudaStream_t stream) {
  switch (bits) {
    case 2: gemv_bits<T, 2>(x2d, qw, perm, gidx, scales, zeros, sal_w, sal_idx, bias, out, N, chunks, cu, stream); break;
    case 3: gemv_bits<T, 3>(x2d, qw, perm, gidx, scales, zeros, sal_w, sal_idx, bias, out, N, chunks, cu, stream); break;
    case 4: gemv_bits<T, 4>(x2d, qw, perm, gidx, scales, zeros, sal_w, sal_idx, bias, out, N, chunks, cu, stream); break;
    default: gemv_bits<T, 8>(x2d, qw, perm, gidx, scales, zeros, sal_w, sal_idx, bias, out, N, chunks, cu, stream); break;
  }
}

template <typename T>
void dequant_dispatch(const torch::Tensor& qw, const torch::Tensor& perm, const torch::Tensor& gidx,
                      const torch::Tensor& scales, const torch::Tensor& zeros, const torch::Tensor& sal_w,
                      const torch::Tensor& sal_idx, torch::Tensor& wt, int64_t bits, int N, int chunks,
                      cudaStream_t stream) {
  switch (bits) {
    case 2: dequant_bits<T, 2>(qw, perm, gidx, scales, zeros, sal_w, sal_idx, wt, N, chunks, stream); break;
    case 3: dequant_bits<T, 3>(qw, perm, gidx, scales, zeros, sal_w, sal_idx, wt, N, chunks, stream); break;
    case 4: dequant_bits<T, 4>(qw, perm, gidx, scales, zeros, sal_w, sal_idx, wt, N, chunks, stream); break;
    default: dequant_bits<T, 8>(qw, perm, gidx, scales, zeros, sal_w, sal_idx, wt, N, chunks, stream); break;
  }
}

}  // namespace

// y [M, N] for x2d [M, K] on the gemv path. Needs N % 4 == 0.
torch::Tensor gemv(torch::Tensor x2d, torch::Tensor qw, torch::Tensor perm, torch::Tensor gidx,
                   torch::Tensor scales, torch::Tensor zeros, torch::Tensor sal_w, torch::Tensor sal_idx,
                   c10::optional<torch::Tensor> bias, int64_t bits, int64_t N, int64_t chunk_uniform) {
  TORCH_CHECK(x2d.is_cuda() && x2d.dim() == 2 && x2d.stride(1) == 1, "x must be a 2-D row-major CUDA tensor");
  check_weights(x2d.scalar_type(), qw, perm, gidx, scales, zeros, sal_w, sal_idx, bits, N);
  TORCH_CHECK(N % kVec == 0, "the gemv path needs out_features % 4 == 0");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == x2d.scalar_type() && bias->is_contiguous() && bias->numel() == N &&
                    aligned(*bias, 8),
                "bias must be contiguous [N] in the activation dtype");
  const c10::cuda::CUDAGuard guard(x2d.device());
  auto out = torch::zeros({x2d.size(0), N}, x2d.options().dtype(at::kFloat));
  if (x2d.size(0) > 0) {
    const int chunks = (int)(qw.size(0) / bits);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (x2d.scalar_type() == at::kHalf)
      gemv_dispatch<__half>(x2d, qw, perm, gidx, scales, zeros, sal_w, sal_idx, bias, out, bits, (int)N, chunks,
                            (int)chunk_uniform, stream);
    else
      gemv_dispatch<__nv_bfloat16>(x2d, qw, perm, gidx, scales, zeros, sal_w, sal_idx, bias, out, bits, (int)N,
                                   chunks, (int)chunk_uniform, stream);
  }
  return out.to(x2d.scalar_type());
}

// Effective weight W^T [K, N] in the scales' dtype (prefill path: the caller runs cuBLAS on it).
torch::Tensor dequant_t(torch::Tensor qw, torch::Tensor perm, torch::Tensor gidx, torch::Tensor scales,
                        torch::Tensor zeros, torch::Tensor sal_w, torch::Tensor sal_idx, int64_t bits, int64_t K,
                        int64_t N) {
  check_weights(scales.scalar_type(), qw, perm, gidx, scales, zeros, sal_w, sal_idx, bits, N);
  const c10::cuda::CUDAGuard guard(qw.device());
  auto wt = torch::empty({K, N}, scales.options());
  const int chunks = (int)(qw.size(0) / bits);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (scales.scalar_type() == at::kHalf)
    dequant_dispatch<__half>(qw, perm, gidx, scales, zeros, sal_w, sal_idx, wt, bits, (int)N, chunks, stream);
  else
    dequant_dispatch<__nv_bfloat16>(qw, perm, gidx, scales, zeros, sal_w, sal_idx, wt, bits, (int)N, chunks, stream);
  return wt;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "fused low-bit + FP16-column GEMV (decode)");
  m.def("dequant_t", &dequant_t, "effective weight W^T [K, N] (prefill)");
}
