// Integer-weight matmuls for XLA:CPU, called through the XLA FFI: small-row (decoding)
// kernels, and a GEMM for weight-only products of more rows (prefill).
//
// pychop_wo_matmul: out = x @ W, W = (v - z') * s, without materialising W
//   x    (M, K) float32
//   v    the stored codes: int8 or uint8 (one per byte), or 4-bit fields (two per byte,
//        along the last storage axis, low nibble first: pychop_jax.core.packing)
//   layout k_axis = 0: v is (K, N) [(K, ceil(N/2)) packed]; k_axis = 1: (N, K)
//        [(N, ceil(K/2)) packed]
//   s, z' float32 per group of K / G codes along K: (G, N) for k_axis = 0, (N, G) for
//        k_axis = 1 (G = 1: per output column); z' is optional, or one value for all
//   out[m, n] = sum_g s[g, n] * (sum_{k in g} x[m, k] v[k, n] - z'[g, n] xs[m, g])
//   with xs[m, g] = sum_{k in g} x[m, k] (computed by the caller, as are xe / xo, the
//   even and odd elements of x, for 4-bit codes packed along K).
//   gemm = true (attribute; AVX2 only): out = x @ W with W[k, n] = (v - z'[g, n]) s[g, n]
//   dequantized once per call, block by block, into a float32 GEMM (no xs / xe / xo).
//
// pychop_int8_matmul: out (M, N) int32 = a (M, K) int8 @ b, b int8 (K, N) or (N, K);
//   exact (the caller passes a widened to int16; products and pair sums fit int32,
//   the sum wraps modulo 2^32 like XLA's int32 dot).
//
// Two implementations of each: AVX2 + FMA (x86-64, chosen at run time) and portable
// scalar loops.  `isa` (attribute) picks one: 0 scalar, 1 AVX2 (only if the CPU has it).
// Work is split over output columns and run on XLA's intra-op thread pool; the calling
// thread takes chunks too and only waits for chunks already being computed, so a busy
// pool cannot deadlock it.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PYCHOP_HAVE_AVX2_CODE 1
#include <immintrin.h>
#define PYCHOP_AVX2 __attribute__((target("avx2,fma")))
#else
#define PYCHOP_HAVE_AVX2_CODE 0
#endif

namespace ffi = xla::ffi;

namespace {

enum CodeKind : int64_t { kS8 = 0, kU8 = 1, kU4 = 2 };

struct WoProblem {
  const float* x;          // (M, K)
  int64_t M, K, N;
  const uint8_t* codes;    // see the header
  int64_t kind, k_axis;
  int64_t G, gs;           // G groups of gs codes along K
  const float* scale;      // (G, N) / (N, G)
  const float* zero;       // like scale (or one value for all), or nullptr
  bool zero_scalar;        // zero holds one value
  const float* xs;         // (M, G), when zero
  const float* xe;         // (M, Kh): x[:, 0::2], kU4 with k_axis = 1
  const float* xo;         // (M, Kh): x[:, 1::2], zero-padded
  int64_t Kh;              // ceil(K / 2)
  float* out;              // (M, N)
};

// -- work splitting --------------------------------------------------------------------
struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::mutex mu;
  std::condition_variable cv;
};

template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t total, const F& body) {
  // the caller is one of the workers
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, total - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < total; ++i) body(i);
    return;
  }
  auto shared = std::make_shared<Shared>();
  shared->total = total;
  const F* fn = &body;  // dereferenced only after a successful claim (caller still waits)
  auto work = [shared, fn]() {
    for (int64_t i; (i = shared->next.fetch_add(1)) < shared->total;) {
      (*fn)(i);
      if (shared->done.fetch_add(1) + 1 == shared->total) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->cv.notify_all();
      }
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == shared->total; });
}

// Column ranges [begin, end) of `chunks` nearly equal parts, multiples of `align`.
struct Split {
  int64_t n, align, chunks;
  int64_t begin(int64_t i) const { return std::min(n, (n / align * i / chunks) * align); }
  int64_t end(int64_t i) const { return i + 1 == chunks ? n : begin(i + 1); }
};

// Up to 4 chunks per thread (a busy machine balances them), none narrower than
// `min_width` columns (for codes laid out (K, N), each chunk reads a `min_width`-byte run
// of every row: short runs streamed badly).
Split SplitColumns(int64_t n, int64_t align, int64_t threads, int64_t min_width) {
  int64_t chunks = std::min<int64_t>(std::max<int64_t>(1, n / align), 4 * (threads + 1));
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, n / min_width));
  return Split{n, align, chunks};
}

// -- scalar kernels (portable; the reference the vector kernels are tested against) -----
inline float CodeValue(const WoProblem& p, int64_t k, int64_t n) {
  if (p.kind == kU4) {
    uint8_t b = p.k_axis == 0 ? p.codes[k * ((p.N + 1) / 2) + n / 2]
                              : p.codes[n * p.Kh + k / 2];
    int64_t odd = p.k_axis == 0 ? (n & 1) : (k & 1);
    return static_cast<float>(odd ? (b >> 4) : (b & 15));
  }
  uint8_t b = p.k_axis == 0 ? p.codes[k * p.N + n] : p.codes[n * p.K + k];
  return p.kind == kS8 ? static_cast<float>(static_cast<int8_t>(b)) : static_cast<float>(b);
}

inline int64_t ScaleIndex(const WoProblem& p, int64_t g, int64_t n) {
  return p.k_axis == 0 ? g * p.N + n : n * p.G + g;
}

void WoScalar(const WoProblem& p, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < p.M; ++m) {
    const float* xm = p.x + m * p.K;
    for (int64_t n = n0; n < n1; ++n) {
      float total = 0.f;
      for (int64_t g = 0; g < p.G; ++g) {
        float acc = 0.f;
        for (int64_t k = g * p.gs; k < (g + 1) * p.gs; ++k) acc += xm[k] * CodeValue(p, k, n);
        int64_t si = ScaleIndex(p, g, n);
        if (p.zero) acc -= p.zero[p.zero_scalar ? 0 : si] * p.xs[m * p.G + g];
        total += p.scale[si] * acc;
      }
      p.out[m * p.N + n] = total;
    }
  }
}

void Int8Scalar(const int16_t* a, const int8_t* b, int32_t* out, int64_t M, int64_t K,
                int64_t N, int64_t b_k_axis, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      uint32_t acc = 0;  // wraps modulo 2^32, as XLA's int32 dot
      for (int64_t k = 0; k < K; ++k) {
        int32_t bv = b_k_axis == 0 ? b[k * N + n] : b[n * K + k];
        acc += static_cast<uint32_t>(a[m * K + k] * bv);
      }
      out[m * N + n] = static_cast<int32_t>(acc);
    }
  }
}

#if PYCHOP_HAVE_AVX2_CODE
// -- AVX2 + FMA kernels -----------------------------------------------------------------
PYCHOP_AVX2 inline __m256 Load8(const uint8_t* p, bool is_signed) {
  __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v));
}

PYCHOP_AVX2 inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

PYCHOP_AVX2 inline int32_t HSumI32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// The end of group g of output column n (codes (N, K)), for rows m0 .. m0 + MB - 1:
// total += s * (the four accumulators' sum), extra += s * (tail - z' * xs).
template <int MB>
PYCHOP_AVX2 inline void CloseGroup(const WoProblem& p, int64_t m0, int64_t n, int64_t g,
                                   const __m256 (&acc)[MB][4], const float* tail,
                                   __m256* total, float* extra) {
  const float s = p.scale[n * p.G + g];
  const __m256 sv = _mm256_set1_ps(s);
  for (int i = 0; i < MB; ++i) {
    __m256 a = _mm256_add_ps(_mm256_add_ps(acc[i][0], acc[i][1]),
                             _mm256_add_ps(acc[i][2], acc[i][3]));
    total[i] = _mm256_fmadd_ps(a, sv, total[i]);
    float corr = p.zero ? p.zero[p.zero_scalar ? 0 : n * p.G + g] * p.xs[(m0 + i) * p.G + g] : 0.f;
    extra[i] += s * (tail[i] - corr);
  }
}

// k_axis = 1, one byte per code: rows n of contiguous codes, MB rows of x at a time.
template <int MB>
PYCHOP_AVX2 void WoNK8(const WoProblem& p, int64_t m0, int64_t n0, int64_t n1) {
  const bool sgn = p.kind == kS8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.codes + n * p.K;
    __m256 total[MB];
    float extra[MB];
    for (int i = 0; i < MB; ++i) total[i] = _mm256_setzero_ps(), extra[i] = 0.f;
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t k0 = g * p.gs, k1 = k0 + p.gs;
      __m256 acc[MB][4];
      for (int i = 0; i < MB; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
      int64_t k = k0;
      for (; k + 32 <= k1; k += 32) {
        for (int j = 0; j < 4; ++j) {
          __m256 w = Load8(row + k + 8 * j, sgn);
          for (int i = 0; i < MB; ++i)
            acc[i][j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(p.x + (m0 + i) * p.K + k + 8 * j),
                                        acc[i][j]);
        }
      }
      for (; k + 8 <= k1; k += 8) {
        __m256 w = Load8(row + k, sgn);
        for (int i = 0; i < MB; ++i)
          acc[i][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(p.x + (m0 + i) * p.K + k), acc[i][0]);
      }
      float tail[MB];
      for (int i = 0; i < MB; ++i) tail[i] = 0.f;
      for (; k < k1; ++k) {
        float w = sgn ? static_cast<float>(static_cast<int8_t>(row[k])) : row[k];
        for (int i = 0; i < MB; ++i) tail[i] += p.x[(m0 + i) * p.K + k] * w;
      }
      CloseGroup<MB>(p, m0, n, g, acc, tail, total, extra);
    }
    for (int i = 0; i < MB; ++i) p.out[(m0 + i) * p.N + n] = HSum(total[i]) + extra[i];
  }
}

// k_axis = 1, 4-bit fields packed along K: byte i holds k = 2i (low) and 2i + 1 (high).
template <int MB>
PYCHOP_AVX2 void WoNK4(const WoProblem& p, int64_t m0, int64_t n0, int64_t n1) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const int64_t gb = p.G == 1 ? p.Kh : p.gs / 2;  // bytes per group
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.codes + n * p.Kh;
    __m256 total[MB];
    float extra[MB];
    for (int i = 0; i < MB; ++i) total[i] = _mm256_setzero_ps(), extra[i] = 0.f;
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t b0 = g * gb, b1 = b0 + gb;
      __m256 acc[MB][4];
      for (int i = 0; i < MB; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
      int64_t b = b0;
      for (; b + 16 <= b1; b += 16) {
        __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b));
        __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        __m256 w[4] = {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                       _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                       _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                       _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)))};
        for (int i = 0; i < MB; ++i) {
          const float* xe = p.xe + (m0 + i) * p.Kh + b;
          const float* xo = p.xo + (m0 + i) * p.Kh + b;
          acc[i][0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xe), acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xe + 8), acc[i][1]);
          acc[i][2] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xo), acc[i][2]);
          acc[i][3] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xo + 8), acc[i][3]);
        }
      }
      float tail[MB];
      for (int i = 0; i < MB; ++i) tail[i] = 0.f;
      for (; b < b1; ++b) {
        float lo = static_cast<float>(row[b] & 15), hi = static_cast<float>(row[b] >> 4);
        for (int i = 0; i < MB; ++i)
          tail[i] += p.xe[(m0 + i) * p.Kh + b] * lo + p.xo[(m0 + i) * p.Kh + b] * hi;
      }
      CloseGroup<MB>(p, m0, n, g, acc, tail, total, extra);
    }
    for (int i = 0; i < MB; ++i) p.out[(m0 + i) * p.N + n] = HSum(total[i]) + extra[i];
  }
}

// k_axis = 0.  Columns [n0, n0 + W) (W a multiple of 32) are computed in tiles of
// KT rows: each tile sweeps the columns 32 or 64 at a time (64 = whole cache lines, one
// row of x) with the accumulators of those columns in registers, reading KT contiguous
// row segments (the column-block-first order strided over whole rows and was several
// times slower); `acc` (MB x W floats) holds the group's partial sums between tiles.
// KT = 8: 16 rows N = 8192 bytes apart share one 8-way L1 set, and 4 rows cost more in
// accumulator traffic (both measured slower).
constexpr int64_t KT = 8;
// Columns per chunk for codes laid out (K, N): 170-column runs (N = 2048 in 12 chunks)
// ran at half the speed of 1024-column ones.
constexpr int64_t kMinRun = 1024;

template <int MB, int NV>
PYCHOP_AVX2 int64_t WoKN8Tile(const WoProblem& p, int64_t m0, int64_t k0, int64_t k1, int64_t n0,
                              int64_t W, float* acc, int64_t c) {
  const bool sgn = p.kind == kS8;
  for (; c + 8 * NV <= W; c += 8 * NV) {
    __m256 a[MB][NV];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NV; ++j) a[i][j] = _mm256_loadu_ps(acc + i * W + c + 8 * j);
    for (int64_t k = k0; k < k1; ++k) {
      const uint8_t* r = p.codes + k * p.N + n0 + c;
      __m256 xb[MB];
      for (int i = 0; i < MB; ++i) xb[i] = _mm256_broadcast_ss(p.x + (m0 + i) * p.K + k);
      for (int j = 0; j < NV; ++j) {
        __m256 w = Load8(r + 8 * j, sgn);
        for (int i = 0; i < MB; ++i) a[i][j] = _mm256_fmadd_ps(xb[i], w, a[i][j]);
      }
    }
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NV; ++j) _mm256_storeu_ps(acc + i * W + c + 8 * j, a[i][j]);
  }
  return c;
}

// 4-bit fields packed along N: byte j holds columns 2j (low) and 2j + 1 (high).  The
// accumulators keep each 32-column block as [even 0..15 | odd 0..15]; WoKN4Order puts
// them back in column order.
template <int MB, int SB>
PYCHOP_AVX2 int64_t WoKN4Tile(const WoProblem& p, int64_t m0, int64_t k0, int64_t k1, int64_t n0,
                              int64_t W, float* acc, int64_t c) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const int64_t nh = (p.N + 1) / 2;
  for (; c + 32 * SB <= W; c += 32 * SB) {
    __m256 a[MB][4 * SB];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < 4 * SB; ++j) a[i][j] = _mm256_loadu_ps(acc + i * W + c + 8 * j);
    for (int64_t k = k0; k < k1; ++k) {
      __m256 xb[MB];
      for (int i = 0; i < MB; ++i) xb[i] = _mm256_broadcast_ss(p.x + (m0 + i) * p.K + k);
      for (int b = 0; b < SB; ++b) {
        __m128i v = _mm_loadu_si128(
            reinterpret_cast<const __m128i*>(p.codes + k * nh + (n0 + c) / 2 + 16 * b));
        __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        __m256 w[4] = {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                       _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                       _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                       _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)))};
        for (int i = 0; i < MB; ++i)
          for (int j = 0; j < 4; ++j)
            a[i][4 * b + j] = _mm256_fmadd_ps(xb[i], w[j], a[i][4 * b + j]);
      }
    }
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < 4 * SB; ++j) _mm256_storeu_ps(acc + i * W + c + 8 * j, a[i][j]);
  }
  return c;
}

// 32 columns [c, c + 32) of accumulators, column order (in place).
PYCHOP_AVX2 inline void WoKN4Order(float* a) {
  __m256 e0 = _mm256_loadu_ps(a), e1 = _mm256_loadu_ps(a + 8);
  __m256 o0 = _mm256_loadu_ps(a + 16), o1 = _mm256_loadu_ps(a + 24);
  __m256 l0 = _mm256_unpacklo_ps(e0, o0), h0 = _mm256_unpackhi_ps(e0, o0);
  __m256 l1 = _mm256_unpacklo_ps(e1, o1), h1 = _mm256_unpackhi_ps(e1, o1);
  _mm256_storeu_ps(a, _mm256_permute2f128_ps(l0, h0, 0x20));
  _mm256_storeu_ps(a + 8, _mm256_permute2f128_ps(l0, h0, 0x31));
  _mm256_storeu_ps(a + 16, _mm256_permute2f128_ps(l1, h1, 0x20));
  _mm256_storeu_ps(a + 24, _mm256_permute2f128_ps(l1, h1, 0x31));
}

PYCHOP_AVX2 void WoKN(const WoProblem& p, int64_t n0, int64_t W) {
  std::unique_ptr<float[]> acc(new float[p.M * W]);
  for (int64_t m = 0; m < p.M; ++m) std::memset(p.out + m * p.N + n0, 0, W * sizeof(float));
  for (int64_t g = 0; g < p.G; ++g) {
    std::memset(acc.get(), 0, p.M * W * sizeof(float));
    for (int64_t k0 = g * p.gs; k0 < (g + 1) * p.gs; k0 += KT) {
      const int64_t k1 = std::min(k0 + KT, (g + 1) * p.gs);
      int64_t m = 0;
      for (; m + 2 <= p.M; m += 2) {
        float* a = acc.get() + m * W;
        p.kind == kU4 ? WoKN4Tile<2, 1>(p, m, k0, k1, n0, W, a, 0)
                      : WoKN8Tile<2, 4>(p, m, k0, k1, n0, W, a, 0);
      }
      if (m < p.M) {  // one row: whole 64-byte lines of codes per step
        float* a = acc.get() + m * W;
        if (p.kind == kU4) {
          WoKN4Tile<1, 1>(p, m, k0, k1, n0, W, a, WoKN4Tile<1, 2>(p, m, k0, k1, n0, W, a, 0));
        } else {
          WoKN8Tile<1, 4>(p, m, k0, k1, n0, W, a, WoKN8Tile<1, 8>(p, m, k0, k1, n0, W, a, 0));
        }
      }
    }
    // out[m, c:c+8] += s[g, c:c+8] * (acc - z'[g, c:c+8] * xs[m, g])
    for (int64_t m = 0; m < p.M; ++m) {
      float* am = acc.get() + m * W;
      const __m256 xs = _mm256_set1_ps(p.zero ? p.xs[m * p.G + g] : 0.f);
      for (int64_t c = 0; c < W; c += 32) {
        if (p.kind == kU4) WoKN4Order(am + c);
        for (int64_t j = c; j < c + 32; j += 8) {
          const int64_t si = g * p.N + n0 + j;
          __m256 a = _mm256_loadu_ps(am + j);
          if (p.zero) {
            __m256 z = p.zero_scalar ? _mm256_set1_ps(p.zero[0]) : _mm256_loadu_ps(p.zero + si);
            a = _mm256_fnmadd_ps(z, xs, a);
          }
          float* o = p.out + m * p.N + n0 + j;
          _mm256_storeu_ps(o, _mm256_fmadd_ps(a, _mm256_loadu_ps(p.scale + si),
                                              _mm256_loadu_ps(o)));
        }
      }
    }
  }
}

// Output columns [n0, n1) of every row, vector blocks first, then the scalar remainder.
PYCHOP_AVX2 void WoAvx2(const WoProblem& p, int64_t n0, int64_t n1) {
  if (p.k_axis == 1) {
    int64_t m = 0;
    for (; m + 3 <= p.M; m += 3)
      p.kind == kU4 ? WoNK4<3>(p, m, n0, n1) : WoNK8<3>(p, m, n0, n1);
    if (p.M - m == 2) p.kind == kU4 ? WoNK4<2>(p, m, n0, n1) : WoNK8<2>(p, m, n0, n1);
    if (p.M - m == 1) p.kind == kU4 ? WoNK4<1>(p, m, n0, n1) : WoNK8<1>(p, m, n0, n1);
    return;
  }
  const int64_t W = (n1 - n0) / 32 * 32;
  if (W > 0) WoKN(p, n0, W);
  const int64_t c = n0 + W;
  if (c < n1) WoScalar(p, c, n1);
}

// -- prefill GEMM (tens to hundreds of rows) -------------------------------------------
// out = x @ W computed like a float32 GEMM whose B operand is packed on the fly: a
// block of KC rows of K x NB output columns of W = (v - z') * s is dequantized once
// into a float buffer laid out as micro-panels of 16 columns ([k][16], contiguous), and
// each micro-panel is used for every row of x by a 6 x 16 register-blocked FMA kernel
// (12 accumulators, 2 weight vectors, 1 broadcast: 15 of AVX2's 16 registers).  Every
// weight is dequantized once per call, whatever M; NB covers whole 64-byte lines of
// codes laid out (K, N), which are read KC rows of N bytes apart.
constexpr int kMR = 6;
constexpr int kNR = 16;
constexpr int64_t kKC = 256;

// Rows [k0 + k_from, k0 + kc) of the micro-panel [c0, c0 + 16) of W, scalar (columns
// past N are zeros).
inline void PackPanelScalar(const WoProblem& p, int64_t k0, int64_t kc, int64_t c0,
                            int64_t k_from, float* buf) {
  for (int64_t k = k0 + k_from; k < k0 + kc; ++k) {
    const int64_t g = k / p.gs;
    for (int64_t j = 0; j < kNR; ++j) {
      const int64_t n = c0 + j;
      float w = 0.f;
      if (n < p.N) {
        const int64_t si = ScaleIndex(p, g, n);
        w = CodeValue(p, k, n);
        if (p.zero) w -= p.zero[p.zero_scalar ? 0 : si];
        w *= p.scale[si];
      }
      buf[(k - k0) * kNR + j] = w;
    }
  }
}

// Scale s and -z' s of the 16 columns [c0, c0 + 16) in group g: w = v s + (-z' s).
PYCHOP_AVX2 inline void PanelScales(const WoProblem& p, int64_t g, int64_t c0, __m256* s,
                                    __m256* zs) {
  for (int h = 0; h < 2; ++h) {
    const int64_t n = c0 + 8 * h;
    __m256 sv, zv = _mm256_setzero_ps();
    if (p.k_axis == 0 || p.G == 1) {  // contiguous along N
      const int64_t i = p.k_axis == 0 ? g * p.N + n : n;
      sv = _mm256_loadu_ps(p.scale + i);
      if (p.zero) zv = p.zero_scalar ? _mm256_set1_ps(p.zero[0]) : _mm256_loadu_ps(p.zero + i);
    } else {  // (N, G): G apart
      alignas(32) float a[8], b[8];
      for (int j = 0; j < 8; ++j) {
        a[j] = p.scale[(n + j) * p.G + g];
        b[j] = p.zero ? p.zero[p.zero_scalar ? 0 : (n + j) * p.G + g] : 0.f;
      }
      sv = _mm256_load_ps(a);
      zv = _mm256_load_ps(b);
    }
    s[h] = sv;
    zs[h] = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), zv), sv);
  }
}

// 8 codes (bytes, low half of v) widened to float.
template <int64_t KIND>
PYCHOP_AVX2 inline __m256 Widen8(__m128i v) {
  return _mm256_cvtepi32_ps(KIND == kS8 ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v));
}

// Codes (K, N): micro-panel [c0, c0 + 16) x rows [k0, k0 + kc), one group at a time.
template <int64_t KIND>
PYCHOP_AVX2 void PackKN(const WoProblem& p, int64_t k0, int64_t kc, int64_t c0, float* buf) {
  const int64_t ld = KIND == kU4 ? (p.N + 1) / 2 : p.N;
  const uint8_t* base = p.codes + (KIND == kU4 ? c0 / 2 : c0);
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t k = k0; k < k0 + kc;) {
    const int64_t g = k / p.gs, kend = std::min(k0 + kc, (g + 1) * p.gs);
    __m256 s[2], zs[2];
    PanelScales(p, g, c0, s, zs);
    for (; k < kend; ++k) {
      const uint8_t* r = base + k * ld;
      __m128i v0, v1;
      if (KIND == kU4) {  // byte j: columns 2j (low), 2j + 1 (high)
        __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r));
        v0 = _mm_unpacklo_epi8(_mm_and_si128(v, mask), _mm_and_si128(_mm_srli_epi16(v, 4), mask));
        v1 = _mm_srli_si128(v0, 8);
      } else {
        v0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r));
        v1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + 8));
      }
      float* o = buf + (k - k0) * kNR;
      _mm256_store_ps(o, _mm256_fmadd_ps(Widen8<KIND>(v0), s[0], zs[0]));
      _mm256_store_ps(o + 8, _mm256_fmadd_ps(Widen8<KIND>(v1), s[1], zs[1]));
    }
  }
}

// Codes (N, K): 8 codes along K of the 8 rows n0.. n0 + 7 from k, transposed: t[j]
// holds k + 2j (low 8 bytes) and k + 2j + 1 (high 8 bytes), one byte per row n.
template <int64_t KIND>
PYCHOP_AVX2 inline void TransposeNK8(const WoProblem& p, int64_t n0, int64_t k, __m128i* t) {
  __m128i r[8];
  for (int i = 0; i < 8; ++i) {
    if (KIND == kU4) {
      int32_t v;
      std::memcpy(&v, p.codes + (n0 + i) * p.Kh + k / 2, 4);
      r[i] = _mm_cvtsi32_si128(v);
    } else {
      r[i] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.codes + (n0 + i) * p.K + k));
    }
  }
  const __m128i a0 = _mm_unpacklo_epi8(r[0], r[1]), a1 = _mm_unpacklo_epi8(r[2], r[3]);
  const __m128i a2 = _mm_unpacklo_epi8(r[4], r[5]), a3 = _mm_unpacklo_epi8(r[6], r[7]);
  const __m128i b0 = _mm_unpacklo_epi16(a0, a1), b2 = _mm_unpacklo_epi16(a2, a3);
  if (KIND == kU4) {  // 4 bytes per row; byte j holds k + 2j (low), k + 2j + 1 (high)
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i c0 = _mm_unpacklo_epi32(b0, b2), c1 = _mm_unpackhi_epi32(b0, b2);
    const __m128i l0 = _mm_and_si128(c0, mask), h0 = _mm_and_si128(_mm_srli_epi16(c0, 4), mask);
    const __m128i l1 = _mm_and_si128(c1, mask), h1 = _mm_and_si128(_mm_srli_epi16(c1, 4), mask);
    t[0] = _mm_unpacklo_epi64(l0, h0);
    t[1] = _mm_unpackhi_epi64(l0, h0);
    t[2] = _mm_unpacklo_epi64(l1, h1);
    t[3] = _mm_unpackhi_epi64(l1, h1);
    return;
  }
  const __m128i b1 = _mm_unpackhi_epi16(a0, a1), b3 = _mm_unpackhi_epi16(a2, a3);
  t[0] = _mm_unpacklo_epi32(b0, b2);
  t[1] = _mm_unpackhi_epi32(b0, b2);
  t[2] = _mm_unpacklo_epi32(b1, b3);
  t[3] = _mm_unpackhi_epi32(b1, b3);
}

// Codes (N, K): micro-panel [c0, c0 + 16) x rows [k0, k0 + kc) through 8 x 8 byte
// transposes (groups a multiple of 8 codes, or one group); the rows past a multiple of
// 8 scalar.
template <int64_t KIND>
PYCHOP_AVX2 void PackNK(const WoProblem& p, int64_t k0, int64_t kc, int64_t c0, float* buf) {
  const int64_t kv = kc / 8 * 8;
  for (int64_t kk = 0; kk < kv;) {
    const int64_t g = (k0 + kk) / p.gs, kend = std::min(kv, (g + 1) * p.gs - k0);
    __m256 s[2], zs[2];
    PanelScales(p, g, c0, s, zs);
    for (; kk < kend; kk += 8) {
      for (int h = 0; h < 2; ++h) {
        __m128i t[4];
        TransposeNK8<KIND>(p, c0 + 8 * h, k0 + kk, t);
        float* o = buf + kk * kNR + 8 * h;
        for (int j = 0; j < 4; ++j) {
          _mm256_store_ps(o + 2 * j * kNR, _mm256_fmadd_ps(Widen8<KIND>(t[j]), s[h], zs[h]));
          _mm256_store_ps(o + (2 * j + 1) * kNR,
                          _mm256_fmadd_ps(Widen8<KIND>(_mm_unpackhi_epi64(t[j], t[j])), s[h],
                                          zs[h]));
        }
      }
    }
  }
  if (kv < kc) PackPanelScalar(p, k0, kc, c0, kv, buf);
}

// Micro-panel [c0, c0 + 16) x rows [k0, k0 + kc) of W into buf ([k - k0][16]).
PYCHOP_AVX2 void PackPanel(const WoProblem& p, int64_t k0, int64_t kc, int64_t c0, float* buf) {
  if (c0 + kNR > p.N || (p.k_axis == 1 && p.G > 1 && p.gs % 8 != 0))
    return PackPanelScalar(p, k0, kc, c0, 0, buf);
  if (p.k_axis == 0) {
    if (p.kind == kS8) return PackKN<kS8>(p, k0, kc, c0, buf);
    if (p.kind == kU8) return PackKN<kU8>(p, k0, kc, c0, buf);
    return PackKN<kU4>(p, k0, kc, c0, buf);
  }
  if (p.kind == kS8) return PackNK<kS8>(p, k0, kc, c0, buf);
  if (p.kind == kU8) return PackNK<kU8>(p, k0, kc, c0, buf);
  return PackNK<kU4>(p, k0, kc, c0, buf);
}

// c[MR x cols] += x[MR x kc] (rows ldx apart) @ b[kc x 16] (a micro-panel).  Named
// accumulators (gcc kept an array of them on the stack, storing every one every step).
#define PYCHOP_ROWS(F) F(0) F(1) F(2) F(3) F(4) F(5)
template <int MR>
PYCHOP_AVX2 void GemmMicro(const float* x, int64_t ldx, const float* b, int64_t kc, float* c,
                           int64_t ldc, int64_t cols) {
  static_assert(MR >= 1 && MR <= kMR, "rows per micro-kernel");
  alignas(32) float tmp[MR * kNR];
  float* cp = c;
  int64_t ld = ldc;
  if (cols < kNR) {  // the last, partial panel: through a full-width copy
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kNR; ++j) tmp[i * kNR + j] = j < cols ? c[i * ldc + j] : 0.f;
    cp = tmp;
    ld = kNR;
  }
#define PYCHOP_INIT(i)                                                                  \
  __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = c##i##0;                               \
  const float* x##i = x + (MR > i ? i : 0) * ldx;                                       \
  if constexpr (MR > i) {                                                               \
    c##i##0 = _mm256_loadu_ps(cp + i * ld);                                             \
    c##i##1 = _mm256_loadu_ps(cp + i * ld + 8);                                         \
  }
  PYCHOP_ROWS(PYCHOP_INIT)
#undef PYCHOP_INIT
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b + k * kNR), b1 = _mm256_load_ps(b + k * kNR + 8);
#define PYCHOP_STEP(i)                                                                  \
  if constexpr (MR > i) {                                                               \
    const __m256 a = _mm256_broadcast_ss(x##i + k);                                     \
    c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0);                                          \
    c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1);                                          \
  }
    PYCHOP_ROWS(PYCHOP_STEP)
#undef PYCHOP_STEP
  }
#define PYCHOP_STORE(i)                                                                 \
  if constexpr (MR > i) {                                                               \
    _mm256_storeu_ps(cp + i * ld, c##i##0);                                             \
    _mm256_storeu_ps(cp + i * ld + 8, c##i##1);                                         \
  }
  PYCHOP_ROWS(PYCHOP_STORE)
#undef PYCHOP_STORE
  if (cols < kNR)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < cols; ++j) c[i * ldc + j] = tmp[i * kNR + j];
}
#undef PYCHOP_ROWS

// Columns per dequantized block: whole 64-byte lines of codes (K, N).
inline int64_t GemmBlock(const WoProblem& p) { return p.kind == kU4 && p.k_axis == 0 ? 128 : 64; }

// The codes of one block (rows [k0, k0 + kc) x columns [b0, b0 + nb)) as `rows` runs of
// `bytes` bytes, `ld` apart, for software prefetches spread over the block before it:
// the strided rows of codes (K, N) came in at a fraction of the memory bandwidth when
// the dequantization asked for them.
struct BlockLines {
  const uint8_t* base = nullptr;
  int64_t rows = 0, ld = 0, bytes = 0, per_row = 0, next = 0;
  BlockLines() = default;
  BlockLines(const WoProblem& p, int64_t k0, int64_t kc, int64_t b0, int64_t nb) {
    const bool u4 = p.kind == kU4;
    if (p.k_axis == 0) {
      ld = u4 ? (p.N + 1) / 2 : p.N;
      base = p.codes + k0 * ld + (u4 ? b0 / 2 : b0);
      rows = kc;
      bytes = u4 ? (nb + 1) / 2 : nb;
    } else {
      ld = u4 ? p.Kh : p.K;
      base = p.codes + b0 * ld + (u4 ? k0 / 2 : k0);
      rows = nb;
      bytes = u4 ? (kc + 1) / 2 : kc;
    }
    per_row = (bytes + 63) / 64 + 1;  // the runs need not start on a line
  }
  int64_t total() const { return rows * per_row; }
  void Issue(int64_t count) {
    for (const int64_t end = std::min(next + count, total()); next < end; ++next) {
      const int64_t r = next / per_row, i = next % per_row;
      const uint8_t* a = base + r * ld + std::min(i * 64, bytes - 1);
      _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T0);
    }
  }
};

// Output columns [n0, n1) of every row.
PYCHOP_AVX2 void WoGemm(const WoProblem& p, int64_t n0, int64_t n1) {
  const int64_t NB = GemmBlock(p);
  std::unique_ptr<float[]> hold(new float[kKC * NB + 8]);
  float* buf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(hold.get()) + 31) & ~uintptr_t{31});
  for (int64_t m = 0; m < p.M; ++m) std::memset(p.out + m * p.N + n0, 0, (n1 - n0) * sizeof(float));
  const int64_t calls = (p.M + kMR - 1) / kMR;  // micro-kernel calls per panel
  for (int64_t k0 = 0; k0 < p.K; k0 += kKC) {
    const int64_t kc = std::min(kKC, p.K - k0);
    for (int64_t b0 = n0; b0 < n1; b0 += NB) {
      const int64_t nb = std::min(NB, n1 - b0);
      for (int64_t j = 0; j < nb; j += kNR) PackPanel(p, k0, kc, b0 + j, buf + j * kc);
      // the next block's codes, a share before each micro-kernel call
      BlockLines ahead;
      if (b0 + NB < n1) {
        ahead = BlockLines(p, k0, kc, b0 + NB, std::min(NB, n1 - b0 - NB));
      } else if (k0 + kKC < p.K) {
        ahead = BlockLines(p, k0 + kKC, std::min(kKC, p.K - k0 - kKC), n0, std::min(NB, n1 - n0));
      }
      const int64_t share = (ahead.total() + calls * ((nb + kNR - 1) / kNR) - 1) /
                            (calls * ((nb + kNR - 1) / kNR));
      for (int64_t j = 0; j < nb; j += kNR) {
        const float* panel = buf + j * kc;
        const int64_t cols = std::min<int64_t>(kNR, nb - j);
        float* c = p.out + b0 + j;
        const float* x = p.x + k0;
        int64_t m = 0;
        for (; m + kMR <= p.M; m += kMR) {
          ahead.Issue(share);
          GemmMicro<kMR>(x + m * p.K, p.K, panel, kc, c + m * p.N, p.N, cols);
        }
        ahead.Issue(share);
        switch (p.M - m) {
          case 5: GemmMicro<5>(x + m * p.K, p.K, panel, kc, c + m * p.N, p.N, cols); break;
          case 4: GemmMicro<4>(x + m * p.K, p.K, panel, kc, c + m * p.N, p.N, cols); break;
          case 3: GemmMicro<3>(x + m * p.K, p.K, panel, kc, c + m * p.N, p.N, cols); break;
          case 2: GemmMicro<2>(x + m * p.K, p.K, panel, kc, c + m * p.N, p.N, cols); break;
          case 1: GemmMicro<1>(x + m * p.K, p.K, panel, kc, c + m * p.N, p.N, cols); break;
          default: break;
        }
      }
    }
  }
}

// b (N, K): out[m, n] = sum_k a16[m, k] b[n, k], 32 codes per step.
template <int MB>
PYCHOP_AVX2 void Int8NK(const int16_t* a, const int8_t* b, int32_t* out, int64_t m0,
                        int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = b + n * K;
    __m256i acc[MB][2];
    for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
      __m256i w1 =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16)));
      for (int i = 0; i < MB; ++i) {
        const int16_t* ai = a + (m0 + i) * K + k;
        acc[i][0] = _mm256_add_epi32(
            acc[i][0], _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ai))));
        acc[i][1] = _mm256_add_epi32(
            acc[i][1],
            _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ai + 16))));
      }
    }
    for (int i = 0; i < MB; ++i) {
      uint32_t s = static_cast<uint32_t>(HSumI32(_mm256_add_epi32(acc[i][0], acc[i][1])));
      for (int64_t t = k; t < K; ++t)
        s += static_cast<uint32_t>(a[(m0 + i) * K + t] * static_cast<int32_t>(row[t]));
      out[(m0 + i) * N + n] = static_cast<int32_t>(s);
    }
  }
}

// b (K, N): tiles of KT rows (an even number) over columns [n0, n0 + W), 32 at a time,
// two rows of b per step (int16 pairs); `acc` (MB x W int32) is the running sum.
template <int MB>
PYCHOP_AVX2 void Int8KNTile(const int16_t* a, const int8_t* b, int32_t* acc, int64_t m0,
                            int64_t K, int64_t N, int64_t k0, int64_t k1, int64_t n0, int64_t W) {
  for (int64_t c = 0; c < W; c += 32) {
    __m256i s[MB][4];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < 4; ++j)
        s[i][j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + i * W + c + 8 * j));
    for (int64_t k = k0; k < k1; k += 2) {
      const int8_t* r = b + k * N + n0 + c;
      __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r));
      __m256i r1 = k + 1 < K ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + N))
                             : _mm256_setzero_si256();
      __m256i il = _mm256_unpacklo_epi8(r0, r1), ih = _mm256_unpackhi_epi8(r0, r1);
      __m256i w[4] = {_mm256_cvtepi8_epi16(_mm256_castsi256_si128(il)),       // columns 0..7
                      _mm256_cvtepi8_epi16(_mm256_castsi256_si128(ih)),       // 8..15
                      _mm256_cvtepi8_epi16(_mm256_extracti128_si256(il, 1)),  // 16..23
                      _mm256_cvtepi8_epi16(_mm256_extracti128_si256(ih, 1))};  // 24..31
      for (int i = 0; i < MB; ++i) {
        const int16_t* ai = a + (m0 + i) * K + k;
        uint32_t lo = static_cast<uint16_t>(ai[0]);
        uint32_t hi = k + 1 < K ? static_cast<uint16_t>(ai[1]) : 0u;
        __m256i ap = _mm256_set1_epi32(static_cast<int32_t>(lo | (hi << 16)));
        for (int j = 0; j < 4; ++j) s[i][j] = _mm256_add_epi32(s[i][j], _mm256_madd_epi16(w[j], ap));
      }
    }
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < 4; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + i * W + c + 8 * j), s[i][j]);
  }
}

PYCHOP_AVX2 void Int8Avx2(const int16_t* a, const int8_t* b, int32_t* out, int64_t M,
                          int64_t K, int64_t N, int64_t b_k_axis, int64_t n0, int64_t n1) {
  if (b_k_axis == 1) {
    int64_t m = 0;
    for (; m + 3 <= M; m += 3) Int8NK<3>(a, b, out, m, K, N, n0, n1);
    if (M - m == 2) Int8NK<2>(a, b, out, m, K, N, n0, n1);
    if (M - m == 1) Int8NK<1>(a, b, out, m, K, N, n0, n1);
    return;
  }
  const int64_t W = (n1 - n0) / 32 * 32;
  if (W > 0) {
    std::unique_ptr<int32_t[]> acc(new int32_t[M * W]());
    for (int64_t k0 = 0; k0 < K; k0 += KT) {
      const int64_t k1 = std::min(k0 + KT, K);
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) Int8KNTile<2>(a, b, acc.get() + m * W, m, K, N, k0, k1, n0, W);
      if (m < M) Int8KNTile<1>(a, b, acc.get() + m * W, m, K, N, k0, k1, n0, W);
    }
    for (int64_t m = 0; m < M; ++m)
      std::memcpy(out + m * N + n0, acc.get() + m * W, W * sizeof(int32_t));
  }
  const int64_t c = n0 + W;
  if (c < n1) Int8Scalar(a, b, out, M, K, N, b_k_axis, c, n1);
}

bool CpuHasAvx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
bool CpuHasAvx2() { return false; }
#endif  // PYCHOP_HAVE_AVX2_CODE

bool UseAvx2(int64_t isa) {
  static const bool has = CpuHasAvx2();
  return isa >= 1 && has;
}

ffi::Error WoMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> zero,
                        ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> xe,
                        ffi::Buffer<ffi::F32> xo, ffi::ResultBuffer<ffi::F32> out,
                        int64_t k_axis, int64_t kind, bool has_zero, bool gemm, int64_t isa) {
  auto xd = x.dimensions(), cd = codes.dimensions(), sd = scale.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2 || od.size() != 2)
    return ffi::Error::InvalidArgument("pychop_wo_matmul: operands must be 2-D");
  if (codes.element_type() != ffi::DataType::S8 && codes.element_type() != ffi::DataType::U8)
    return ffi::Error::InvalidArgument("pychop_wo_matmul: codes must be int8 or uint8");
  WoProblem p{};
  p.x = x.typed_data();
  p.M = xd[0];
  p.K = xd[1];
  p.N = od[1];
  p.codes = static_cast<const uint8_t*>(codes.untyped_data());
  p.kind = kind;
  p.k_axis = k_axis;
  p.G = k_axis == 0 ? sd[0] : sd[1];
  p.Kh = (p.K + 1) / 2;
  const int64_t want0 = k_axis == 0 ? p.K : p.N;
  const int64_t want1 = k_axis == 0 ? (kind == kU4 ? (p.N + 1) / 2 : p.N)
                                    : (kind == kU4 ? p.Kh : p.K);
  if (od[0] != p.M || cd[0] != want0 || cd[1] != want1 || p.G < 1 || p.K % p.G != 0 ||
      (k_axis == 0 ? sd[1] : sd[0]) != p.N)
    return ffi::Error::InvalidArgument("pychop_wo_matmul: inconsistent shapes");
  p.gs = p.K / p.G;
  if (kind == kU4 && k_axis == 1 && p.G > 1 && p.gs % 2 != 0)
    return ffi::Error::InvalidArgument("pychop_wo_matmul: packed groups must be even");
  p.scale = scale.typed_data();
  const bool avx2 = UseAvx2(isa);
  if (gemm && !avx2)  // (the caller asks for it only where the AVX2 kernels run)
    return ffi::Error::InvalidArgument("pychop_wo_matmul: the GEMM needs AVX2 + FMA");
  // the GEMM folds the zero point into the weights: no xs, xe, xo
  if (has_zero) {
    if ((zero.element_count() != scale.element_count() && zero.element_count() != 1) ||
        (!gemm && xs.element_count() != static_cast<size_t>(p.M * p.G)))
      return ffi::Error::InvalidArgument("pychop_wo_matmul: zero point / group sums shape");
    p.zero = zero.typed_data();
    p.zero_scalar = zero.element_count() == 1;
    p.xs = xs.typed_data();
  }
  if (kind == kU4 && k_axis == 1 && !gemm) {
    if (xe.element_count() != static_cast<size_t>(p.M * p.Kh) ||
        xo.element_count() != static_cast<size_t>(p.M * p.Kh))
      return ffi::Error::InvalidArgument("pychop_wo_matmul: even / odd halves of x");
    p.xe = xe.typed_data();
    p.xo = xo.typed_data();
  }
  p.out = out->typed_data();
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
#if PYCHOP_HAVE_AVX2_CODE
  if (gemm) {
    const int64_t nb = GemmBlock(p);
    const Split split = SplitColumns(p.N, p.N >= nb ? nb : kNR, pool.num_threads(), kNR);
    ParallelFor(pool, split.chunks, [&](int64_t i) {
      int64_t n0 = split.begin(i), n1 = split.end(i);
      if (n0 < n1) WoGemm(p, n0, n1);
    });
    return ffi::Error::Success();
  }
#endif
  const Split split = k_axis == 0 ? SplitColumns(p.N, 32, pool.num_threads(), kMinRun)
                                   : SplitColumns(p.N, 8, pool.num_threads(), 8);
  ParallelFor(pool, split.chunks, [&](int64_t i) {
    int64_t n0 = split.begin(i), n1 = split.end(i);
    if (n0 >= n1) return;
#if PYCHOP_HAVE_AVX2_CODE
    if (avx2) return WoAvx2(p, n0, n1);
#endif
    WoScalar(p, n0, n1);
  });
  return ffi::Error::Success();
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S16> a, ffi::Buffer<ffi::S8> b,
                          ffi::ResultBuffer<ffi::S32> out, int64_t b_k_axis, int64_t isa) {
  auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || od.size() != 2)
    return ffi::Error::InvalidArgument("pychop_int8_matmul: operands must be 2-D");
  const int64_t M = ad[0], K = ad[1], N = od[1];
  if (od[0] != M || (b_k_axis == 0 ? (bd[0] != K || bd[1] != N) : (bd[0] != N || bd[1] != K)))
    return ffi::Error::InvalidArgument("pychop_int8_matmul: inconsistent shapes");
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int16_t* ap = a.typed_data();
  const int8_t* bp = b.typed_data();
  int32_t* op = out->typed_data();
  const bool avx2 = UseAvx2(isa);
  const Split split = b_k_axis == 0 ? SplitColumns(N, 32, pool.num_threads(), kMinRun)
                                     : SplitColumns(N, 8, pool.num_threads(), 8);
  ParallelFor(pool, split.chunks, [&](int64_t i) {
    int64_t n0 = split.begin(i), n1 = split.end(i);
    if (n0 >= n1) return;
#if PYCHOP_HAVE_AVX2_CODE
    if (avx2) return Int8Avx2(ap, bp, op, M, K, N, b_k_axis, n0, n1);
#endif
    Int8Scalar(ap, bp, op, M, K, N, b_k_axis, n0, n1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PychopWoMatmul, WoMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::AnyBuffer>()         // codes
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // zero point (z - qmin)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // group sums of x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x[:, 0::2]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x[:, 1::2]
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k_axis")
                                  .Attr<int64_t>("kind")
                                  .Attr<bool>("has_zero")
                                  .Attr<bool>("gemm")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PychopInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S16>>()  // a, widened
                                  .Arg<ffi::Buffer<ffi::S8>>()   // b
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("b_k_axis")
                                  .Attr<int64_t>("isa"));

// The best kernel this build can run here: 1 = AVX2 + FMA, 0 = scalar loops only.
extern "C" int PychopDecodeIsa() { return UseAvx2(1) ? 1 : 0; }
