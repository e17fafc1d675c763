// bnnslim runtime: binary conv2d on packed weights and packed activations.
//
// Built once by bnnslim/runtime/build.py (torch.utils.cpp_extension, JIT) with
// baseline x86-64 flags; the SIMD paths carry their own target attributes and
// are chosen at run time with __builtin_cpu_supports, so one build runs on any
// x86-64 CPU (and the portable scalar path on any other CPU).
//
// Packed activations (int64 words, op `pack_input`):
//   [N, Hp, G*NWg, 2, SW, Wq]
//   Hp, Wp   the zero-padded input size; NWg = ceil(Cg / 64) words per group
//   plane 0  sign bits: bit k of word j = (x[c] > 0), c = g*Cg + 64*j + k
//   plane 1  nonzero bits: (x[c] != 0); 0 for padding taps, padding channels,
//            masked channels and exact zeros, so those contribute exactly 0
//            (NaN inputs also get 0 here, where torch's sign() would give NaN)
//   SW, Wq   columns split by phase for stride SW: padded column iw lives at
//            [iw % SW][iw / SW]; Wq = ceil(Wp / SW) + 8 (slack for 8-wide loads)
//   a conv with paired taps (at most 32 channels per group) gets a second
//   image of the same shape after the first (see "paired taps" below)
// Packed weights (int64 words, made by layers.py from the uint8 export format):
//   [G, OBg, KH, KW, NWg, NB]   NB = 8 output channels per block, zero padded
// Per output (o, p):  P = sum popcount((s ^ w) & nz),  V = sum popcount(nz),
//   dot = V - 2 P  (= sum over nonzero inputs of sign(x) * sign(w), exactly),
//   y = float(dot) * alpha[o] + bias[o]   (mul then add, as torch does),
//   then min(max(y, lo), hi) with a clamp (a Hardtanh / ReLU folded in, fuse.py),
//   or, with output thresholds (a fused chain, see fuse.py), packed ternary
//   bits [N, OH, OW, ceil(O/64), 2] for the next binary conv, which reads them
//   with binary_conv2d_bits; bits_max_pool2d pools them (an OR of sign bits).
// Vector lanes: pixels of an output row (AVX2: 4, AVX-512: 8), or on AVX-512
// the 8 channels of a weight block where the rows are too narrow to fill them.
// The ops are registered with torch (torch.ops.bnnslim_rt) and exported as a
// pybind11 module, which layers.py calls directly (less per-call overhead).

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <tuple>
#include <variant>
#include <vector>

// The SIMD paths use GCC/Clang target attributes and CPU builtins; other
// compilers (MSVC), other CPUs and builds with BNN_PORTABLE defined (a test checks that it compiles) build the
// portable scalar path only.
#if !defined(BNN_PORTABLE) && (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define BNN_X86 1
#include <immintrin.h>
#else
#define BNN_X86 0
#endif
#if defined(__GNUC__) || defined(__clang__)
#define BNN_INLINE __attribute__((always_inline)) inline
#else
#define BNN_INLINE __forceinline
#endif

namespace {

constexpr int64_t NB = 8;  // output channels per weight block

enum Isa : int64_t { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_POPCNT = 2, ISA_AVX2 = 3, ISA_AVX512 = 4 };

bool cpu_has(int64_t isa) {
#if BNN_X86
  __builtin_cpu_init();
  switch (isa) {
    case ISA_SCALAR: return true;
    case ISA_POPCNT: return __builtin_cpu_supports("popcnt");
    case ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case ISA_AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("popcnt");
    default: return false;
  }
#else
  return isa == ISA_SCALAR;
#endif
}

int64_t best_isa() {
  for (int64_t isa : {ISA_AVX512, ISA_AVX2, ISA_POPCNT}) {
    if (cpu_has(isa)) return isa;
  }
  return ISA_SCALAR;
}

int64_t resolve_isa(int64_t isa) {
  if (isa == ISA_AUTO) return best_isa();
  TORCH_CHECK(isa >= ISA_SCALAR && isa <= ISA_AVX512, "bnnslim runtime: unknown isa code ", isa);
  TORCH_CHECK(cpu_has(isa), "bnnslim runtime: this CPU lacks the instruction set of kernel ", isa);
  return isa;
}

const char* isa_name(int64_t isa) {
  switch (isa) {
    case ISA_AVX512: return "avx512_vpopcntdq";
    case ISA_AVX2: return "avx2";
    case ISA_POPCNT: return "popcnt";
    default: return "scalar";
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Geo {
  int64_t N, C, H, W;            // input
  int64_t G, Cg, NWg, GW;        // groups, channels per group, words per group, G*NWg
  int64_t O, Og, OBg;            // out channels, per group, weight blocks per group
  int64_t KH, KW, SH, SW, DH, DW;
  int64_t PT, PB, PL, PR;        // padding top, bottom, left, right
  int64_t Hp, Wp, Wq, OH, OW;
  int64_t plane;                 // words between the sign and the nonzero plane: SW * Wq
  int64_t word_stride;           // words between consecutive packed words: 2 * plane
  int64_t row_stride;            // words per padded input row: GW * word_stride
  int64_t img_stride;            // Hp * row_stride
};

// ---------------------------------------------------------------- packing

// Portable packer for any float layout; the row loop ("for k: for w") lets the
// compiler vectorise over pixels when the input is NCHW.
void pack_rows_generic(const Geo& g, const float* x, int64_t sN, int64_t sC, int64_t sH, int64_t sW,
                       const bool* mask, int64_t* out, int64_t task_begin, int64_t task_end) {
  std::vector<uint64_t> ts(g.W), tz(g.W);
  for (int64_t t = task_begin; t < task_end; ++t) {
    const int64_t n = t / g.H, ih = t % g.H;
    int64_t* row = out + n * g.img_stride + (ih + g.PT) * g.row_stride;
    for (int64_t gi = 0; gi < g.G; ++gi) {
      for (int64_t j = 0; j < g.NWg; ++j) {
        std::fill(ts.begin(), ts.end(), 0);
        std::fill(tz.begin(), tz.end(), 0);
        const int64_t kmax = std::min<int64_t>(64, g.Cg - 64 * j);
        for (int64_t k = 0; k < kmax; ++k) {
          const int64_t c = gi * g.Cg + 64 * j + k;
          if (mask != nullptr && !mask[c]) continue;
          const float* xr = x + n * sN + c * sC + ih * sH;
          for (int64_t w = 0; w < g.W; ++w) {
            const float v = xr[w * sW];
            ts[w] |= static_cast<uint64_t>(v > 0.0f) << k;
            tz[w] |= static_cast<uint64_t>(v > 0.0f || v < 0.0f) << k;  // NaN: 0, as in the SIMD paths
          }
        }
        int64_t* dst = row + (gi * g.NWg + j) * g.word_stride;
        for (int64_t w = 0; w < g.W; ++w) {
          const int64_t iw = w + g.PL;
          const int64_t at = (iw % g.SW) * g.Wq + iw / g.SW;
          dst[at] = static_cast<int64_t>(ts[w]);
          dst[g.plane + at] = static_cast<int64_t>(tz[w]);
        }
      }
    }
  }
}

// The padded column iw = w + PL of an input row, w = 0, 1, ..., in the phase-split layout: phase iw % SW,
// position iw / SW, at word phase * Wq + position. Stepped along instead of divided per pixel, and held in
// locals as the packers keep Geo's fields: stores through int64_t pointers could alias them and make the compiler
// reload them after every store (the division and the reloads doubled a channels-last pack's time).
struct PhaseColumns {
  int64_t phase, pos;
  const int64_t SW, Wq;
  explicit PhaseColumns(const Geo& g) : phase(g.PL % g.SW), pos(g.PL / g.SW), SW(g.SW), Wq(g.Wq) {}
  BNN_INLINE int64_t next() {  // this column's word offset; moves to the next column
    const int64_t at = phase * Wq + pos;
    if (++phase == SW) {
      phase = 0;
      ++pos;
    }
    return at;
  }
};

#if BNN_X86
#define BNN_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512vpopcntdq,popcnt,bmi2")))
#define BNN_AVX2 __attribute__((target("avx2,popcnt,bmi2")))
#define BNN_POPCNT __attribute__((target("popcnt")))

// NCHW rows (unit stride along W): 16 pixels per step; compare masks set bit k
// of the low or high 32-bit half of 16 words, interleaved into words at the end.
BNN_AVX512 void pack_rows_avx512_nchw(const Geo& g, const float* x, int64_t sN, int64_t sC, int64_t sH,
                                      const bool* mask, int64_t* out, int64_t task_begin, int64_t task_end) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  alignas(64) int64_t ts[16], tz[16];
  for (int64_t t = task_begin; t < task_end; ++t) {
    const int64_t n = t / g.H, ih = t % g.H;
    int64_t* row = out + n * g.img_stride + (ih + g.PT) * g.row_stride;
    for (int64_t gi = 0; gi < g.G; ++gi) {
      for (int64_t j = 0; j < g.NWg; ++j) {
        const int64_t kmax = std::min<int64_t>(64, g.Cg - 64 * j);
        const int64_t c0 = gi * g.Cg + 64 * j;
        int64_t* dst = row + (gi * g.NWg + j) * g.word_stride;
        for (int64_t w0 = 0; w0 < g.W; w0 += 16) {
          const int64_t nw = std::min<int64_t>(16, g.W - w0);
          const __mmask16 lm = static_cast<__mmask16>((1u << nw) - 1u);
          __m512i half_s[2], half_z[2];
          const float* xp = x + n * sN + c0 * sC + ih * sH + w0;
          for (int h = 0; h < 2; ++h) {
            __m512i hs = _mm512_setzero_si512(), hz = hs;
            const int64_t kend = std::min<int64_t>(kmax, 32 * (h + 1));
            for (int64_t k = 32 * h; k < kend; ++k) {
              if (mask != nullptr && !mask[c0 + k]) continue;
              const __m512 v = _mm512_maskz_loadu_ps(lm, xp + k * sC);
              const __m512i bit = _mm512_set1_epi32(static_cast<int32_t>(1u << (k & 31)));
              hs = _mm512_mask_or_epi32(hs, _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), hs, bit);
              hz = _mm512_mask_or_epi32(hz, _mm512_cmp_ps_mask(v, zero, _CMP_NEQ_OQ), hz, bit);
            }
            half_s[h] = hs;
            half_z[h] = hz;
          }
          const __m512i s0 = _mm512_permutex2var_epi32(half_s[0], lo_idx, half_s[1]);
          const __m512i s1 = _mm512_permutex2var_epi32(half_s[0], hi_idx, half_s[1]);
          const __m512i z0 = _mm512_permutex2var_epi32(half_z[0], lo_idx, half_z[1]);
          const __m512i z1 = _mm512_permutex2var_epi32(half_z[0], hi_idx, half_z[1]);
          if (g.SW == 1) {
            int64_t* d = dst + w0 + g.PL;
            const __mmask8 m0 = static_cast<__mmask8>(lm), m1 = static_cast<__mmask8>(lm >> 8);
            _mm512_mask_storeu_epi64(d, m0, s0);
            _mm512_mask_storeu_epi64(d + 8, m1, s1);
            _mm512_mask_storeu_epi64(d + g.plane, m0, z0);
            _mm512_mask_storeu_epi64(d + g.plane + 8, m1, z1);
          } else {
            _mm512_store_si512(ts, s0);
            _mm512_store_si512(ts + 8, s1);
            _mm512_store_si512(tz, z0);
            _mm512_store_si512(tz + 8, z1);
            for (int64_t w = 0; w < nw; ++w) {
              const int64_t iw = w0 + w + g.PL;
              const int64_t at = (iw % g.SW) * g.Wq + iw / g.SW;
              dst[at] = ts[w];
              dst[g.plane + at] = tz[w];
            }
          }
        }
      }
    }
  }
}

// Channels-last rows (unit stride along C): one 64-channel word per pixel from
// four 16-float compares.
BNN_AVX512 void pack_rows_avx512_nhwc(const Geo& g, const float* x, int64_t sN, int64_t sH, int64_t sW,
                                      const bool* mask, const int64_t* maskw, int64_t* out,
                                      int64_t task_begin, int64_t task_end) {
  // the geometry in locals (see PhaseColumns), word by word
  const int64_t H = g.H, W = g.W, Cg = g.Cg, NWg = g.NWg, GW = g.GW, plane = g.plane, word_stride = g.word_stride;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t t = task_begin; t < task_end; ++t) {
    const int64_t n = t / H, ih = t % H;
    int64_t* row = out + n * g.img_stride + (ih + g.PT) * g.row_stride;
    const float* xrow = x + n * sN + ih * sH;
    for (int64_t word = 0; word < GW; ++word) {  // word = gi * NWg + j: channels c0 .. c0 + 63 of group gi
      const int64_t gi = word / NWg, j = word % NWg;
      const int64_t c0 = gi * Cg + 64 * j;
      const int64_t kmax = std::min<int64_t>(64, Cg - 64 * j);
      const int64_t nq = (kmax + 15) / 16;
      __mmask16 lm[4];
      for (int64_t q = 0; q < 4; ++q) {
        const int64_t nk = std::clamp<int64_t>(kmax - q * 16, 0, 16);
        lm[q] = static_cast<__mmask16>((1u << nk) - 1u);
      }
      const uint64_t keep = mask != nullptr ? static_cast<uint64_t>(maskw[word]) : ~uint64_t{0};
      int64_t* dst = row + word * word_stride;
      PhaseColumns column(g);
      for (int64_t w = 0; w < W; ++w) {
        const float* xp = xrow + w * sW + c0;
        uint64_t s = 0, z = 0;
        for (int64_t q = 0; q < nq; ++q) {
          const __m512 v = _mm512_maskz_loadu_ps(lm[q], xp + q * 16);
          s |= static_cast<uint64_t>(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ)) << (16 * q);
          z |= static_cast<uint64_t>(_mm512_cmp_ps_mask(v, zero, _CMP_NEQ_OQ)) << (16 * q);
        }
        z &= keep;
        const int64_t at = column.next();
        dst[at] = static_cast<int64_t>(s & z);
        dst[plane + at] = static_cast<int64_t>(z);
      }
    }
  }
}

// AVX2, NCHW rows: 8 pixels per step; the low and high 32 channels of each word
// build up in two 8 x uint32 vectors, interleaved into 64-bit words at the end.
BNN_AVX2 void pack_rows_avx2_nchw(const Geo& g, const float* x, int64_t sN, int64_t sC, int64_t sH,
                                  const bool* mask, int64_t* out, int64_t task_begin, int64_t task_end) {
  const __m256 zero = _mm256_setzero_ps();
  alignas(32) int64_t ts[8], tz[8];
  alignas(32) static const int32_t lane_idx[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_idx));
  for (int64_t t = task_begin; t < task_end; ++t) {
    const int64_t n = t / g.H, ih = t % g.H;
    int64_t* row = out + n * g.img_stride + (ih + g.PT) * g.row_stride;
    for (int64_t gi = 0; gi < g.G; ++gi) {
      for (int64_t j = 0; j < g.NWg; ++j) {
        const int64_t kmax = std::min<int64_t>(64, g.Cg - 64 * j);
        int64_t* dst = row + (gi * g.NWg + j) * g.word_stride;
        for (int64_t w0 = 0; w0 < g.W; w0 += 8) {
          const int64_t nw = std::min<int64_t>(8, g.W - w0);
          const __m256i lm = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(nw)), idx);
          __m256i hs[2], hz[2];
          const float* xp = x + n * sN + (gi * g.Cg + 64 * j) * sC + ih * sH + w0;
          for (int h = 0; h < 2; ++h) {
            __m256i as = _mm256_setzero_si256(), az = as;
            const int64_t kend = std::min<int64_t>(kmax, 32 * (h + 1));
            for (int64_t k = 32 * h; k < kend; ++k) {
              if (mask != nullptr && !mask[gi * g.Cg + 64 * j + k]) continue;
              const float* src = xp + k * sC;
              const __m256 v = nw == 8 ? _mm256_loadu_ps(src) : _mm256_maskload_ps(src, lm);
              const __m256i bit = _mm256_set1_epi32(static_cast<int32_t>(1u << (k & 31)));
              as = _mm256_or_si256(as, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, zero, _CMP_GT_OQ)), bit));
              az = _mm256_or_si256(az, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, zero, _CMP_NEQ_OQ)), bit));
            }
            hs[h] = as;
            hz[h] = az;
          }
          const __m256i sl = hs[0], sh = hs[1], zl = hz[0], zh = hz[1];
          // (lo, hi) pairs -> 64-bit words of pixels 0-3 and 4-7
          const __m256i s_a = _mm256_unpacklo_epi32(sl, sh), s_b = _mm256_unpackhi_epi32(sl, sh);
          const __m256i z_a = _mm256_unpacklo_epi32(zl, zh), z_b = _mm256_unpackhi_epi32(zl, zh);
          _mm256_store_si256(reinterpret_cast<__m256i*>(ts), _mm256_permute2x128_si256(s_a, s_b, 0x20));
          _mm256_store_si256(reinterpret_cast<__m256i*>(ts + 4), _mm256_permute2x128_si256(s_a, s_b, 0x31));
          _mm256_store_si256(reinterpret_cast<__m256i*>(tz), _mm256_permute2x128_si256(z_a, z_b, 0x20));
          _mm256_store_si256(reinterpret_cast<__m256i*>(tz + 4), _mm256_permute2x128_si256(z_a, z_b, 0x31));
          for (int64_t w = 0; w < nw; ++w) {
            const int64_t iw = w0 + w + g.PL;
            const int64_t at = (iw % g.SW) * g.Wq + iw / g.SW;
            dst[at] = ts[w];
            dst[g.plane + at] = tz[w];
          }
        }
      }
    }
  }
}

// AVX2, channels-last rows: one word per pixel from eight 8-float compares.
BNN_AVX2 void pack_rows_avx2_nhwc(const Geo& g, const float* x, int64_t sN, int64_t sH, int64_t sW,
                                  const int64_t* maskw, int64_t* out, int64_t task_begin, int64_t task_end) {
  // the geometry in locals (see PhaseColumns), word by word
  const int64_t H = g.H, W = g.W, Cg = g.Cg, NWg = g.NWg, GW = g.GW, plane = g.plane, word_stride = g.word_stride;
  const __m256 zero = _mm256_setzero_ps();
  alignas(32) float tail[8];
  for (int64_t t = task_begin; t < task_end; ++t) {
    const int64_t n = t / H, ih = t % H;
    int64_t* row = out + n * g.img_stride + (ih + g.PT) * g.row_stride;
    const float* xrow = x + n * sN + ih * sH;
    for (int64_t word = 0; word < GW; ++word) {
      const int64_t gi = word / NWg, j = word % NWg;
      const int64_t c0 = gi * Cg + 64 * j;
      const int64_t kmax = std::min<int64_t>(64, Cg - 64 * j);
      const int64_t full = kmax / 8, rest = kmax % 8;  // whole 8-float loads, then a partial one
      const uint64_t keep = maskw != nullptr ? static_cast<uint64_t>(maskw[word]) : ~uint64_t{0};
      int64_t* dst = row + word * word_stride;
      PhaseColumns column(g);
      for (int64_t w = 0; w < W; ++w) {
        const float* xp = xrow + w * sW + c0;
        uint64_t s = 0, z = 0;
        for (int64_t q = 0; q <= full; ++q) {
          const float* src = xp + q * 8;
          if (q == full) {
            if (rest == 0) break;
            std::fill(tail, tail + 8, 0.0f);
            std::copy(src, src + rest, tail);
            src = tail;
          }
          const __m256 v = _mm256_loadu_ps(src);
          s |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ))) << (8 * q);
          z |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NEQ_OQ))) << (8 * q);
        }
        z &= keep;
        const int64_t at = column.next();
        dst[at] = static_cast<int64_t>(s & z);
        dst[plane + at] = static_cast<int64_t>(z);
      }
    }
  }
}
#endif  // BNN_X86

// ---------------------------------------------------------------- small helpers
//
// Batch-1 layers are small enough that every ATen dispatcher call (a few
// hundred ns to a microsecond each) shows: buffers are allocated with
// empty_cpu and cleared with memset, and inputs already of the right type are
// used as they are.

at::Tensor empty_long(at::IntArrayRef sizes) {
  return at::Tensor(at::detail::empty_cpu(sizes, at::kLong, /*pin_memory=*/false, std::nullopt));
}

at::Tensor zeros_long(at::IntArrayRef sizes) {
  at::Tensor t = empty_long(sizes);
  std::memset(t.data_ptr<int64_t>(), 0, t.numel() * sizeof(int64_t));
  return t;
}

at::Tensor as_type(const at::Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type && t.is_contiguous() ? t : t.to(type).contiguous();
}

Geo make_geo_dims(int64_t N, int64_t C, int64_t H, int64_t W, int64_t out_channels, int64_t KH, int64_t KW,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(stride.size() == 2 && dilation.size() == 2 && padding.size() == 4,
              "bnnslim runtime: stride and dilation take 2 values, padding 4 (top, bottom, left, right)");
  Geo g{};
  g.N = N; g.C = C; g.H = H; g.W = W;
  g.G = groups;
  TORCH_CHECK(groups >= 1 && g.C % groups == 0 && out_channels % groups == 0,
              "bnnslim runtime: channels not divisible by groups");
  g.Cg = g.C / groups; g.NWg = ceil_div(g.Cg, 64); g.GW = g.G * g.NWg;
  g.O = out_channels; g.Og = out_channels / groups; g.OBg = ceil_div(g.Og, NB);
  g.KH = KH; g.KW = KW; g.SH = stride[0]; g.SW = stride[1]; g.DH = dilation[0]; g.DW = dilation[1];
  g.PT = padding[0]; g.PB = padding[1]; g.PL = padding[2]; g.PR = padding[3];
  TORCH_CHECK(g.SH >= 1 && g.SW >= 1 && g.DH >= 1 && g.DW >= 1 && g.PT >= 0 && g.PB >= 0 && g.PL >= 0 &&
                  g.PR >= 0, "bnnslim runtime: bad stride, dilation or padding");
  g.Hp = g.H + g.PT + g.PB; g.Wp = g.W + g.PL + g.PR;
  g.OH = (g.Hp - g.DH * (KH - 1) - 1) / g.SH + 1;
  g.OW = (g.Wp - g.DW * (KW - 1) - 1) / g.SW + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "bnnslim runtime: the kernel is larger than the padded input");
  g.Wq = ceil_div(g.Wp, g.SW) + 8;
  g.plane = g.SW * g.Wq;
  g.word_stride = 2 * g.plane;
  g.row_stride = g.GW * g.word_stride;
  g.img_stride = g.Hp * g.row_stride;
  return g;
}

Geo make_geo(const at::Tensor& x, int64_t out_channels, int64_t KH, int64_t KW, at::IntArrayRef stride,
             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "bnnslim runtime: expected a 4-d NCHW input, got ", x.dim(), " dims");
  return make_geo_dims(x.size(0), x.size(1), x.size(2), x.size(3), out_channels, KH, KW, stride, padding, dilation,
                       groups);
}

// Packed ternary activations ("bits", written by a conv with output thresholds
// or by bits_max_pool2d): int64 [N, H, W, NW, 2], NW = ceil(C / 64); word j of a
// pixel holds channels 64j..64j+63, plane 0 sign bits, plane 1 nonzero bits.
// Copies them into a conv's padded, phase-split layout (groups must start on
// word boundaries: one group, or a multiple of 64 channels per group).
at::Tensor pack_from_bits(const at::Tensor& bits_in, const Geo& g, const c10::optional<at::Tensor>& in_mask,
                          int64_t images = 1) {
  TORCH_CHECK(bits_in.device().is_cpu() && bits_in.scalar_type() == at::kLong && bits_in.dim() == 5 &&
                  bits_in.size(3) == ceil_div(g.C, 64) && bits_in.size(4) == 2,
              "bnnslim runtime: packed activations must be int64 [N, H, W, ceil(C/64), 2]");
  TORCH_CHECK(g.G == 1 || g.Cg % 64 == 0, "bnnslim runtime: packed activations need groups of 64k channels");
  const at::Tensor bits = bits_in.contiguous();
  std::vector<uint64_t> maskw(g.GW, ~uint64_t{0});
  if (in_mask.has_value() && in_mask->defined()) {
    const at::Tensor m = as_type(*in_mask, at::kBool);
    TORCH_CHECK(m.numel() == g.C, "bnnslim runtime: input mask must have one value per input channel");
    const bool* mp = m.data_ptr<bool>();
    for (int64_t c = 0; c < g.C; ++c)
      if (!mp[c]) maskw[c / 64] &= ~(uint64_t{1} << (c % 64));
  }
  const int64_t* src = bits.data_ptr<int64_t>();
  if (images == 1 && g.SW == 1) {
    // One phase (stride 1 across): each word plane of a row is the input's words at a fixed stride, copied in
    // order, and only the padding and the 8 columns of slack are zeroed (the general loop below zeroes the
    // whole buffer, then scatters pixel by pixel: 15 % of a 1x1 conv over two words at 32x32)
    at::Tensor out = empty_long({g.N, g.Hp, g.GW, 2, 1, g.Wq});
    int64_t* op = out.data_ptr<int64_t>();
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t r = 0; r < g.Hp; ++r)
        if (r < g.PT || r >= g.PT + g.H)
          std::memset(op + n * g.img_stride + r * g.row_stride, 0, g.row_stride * sizeof(int64_t));
    const int64_t step = g.GW * 2, tail = g.Wq - g.PL - g.W;
    at::parallel_for(0, g.N * g.H, 8, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / g.H, ih = t % g.H;
        int64_t* row = op + n * g.img_stride + (ih + g.PT) * g.row_stride;
        for (int64_t j = 0; j < g.GW; ++j) {
          int64_t* __restrict sign = row + j * g.word_stride;
          int64_t* __restrict nonzero = sign + g.plane;
          std::memset(sign, 0, g.PL * sizeof(int64_t));
          std::memset(nonzero, 0, g.PL * sizeof(int64_t));
          std::memset(sign + g.PL + g.W, 0, tail * sizeof(int64_t));
          std::memset(nonzero + g.PL + g.W, 0, tail * sizeof(int64_t));
          const int64_t* __restrict in = src + t * g.W * step + 2 * j;
          const uint64_t keep = maskw[j];
          for (int64_t w = 0; w < g.W; ++w) {
            const uint64_t z = static_cast<uint64_t>(in[w * step + 1]) & keep;
            sign[g.PL + w] = static_cast<int64_t>(static_cast<uint64_t>(in[w * step]) & z);
            nonzero[g.PL + w] = static_cast<int64_t>(z);
          }
        }
      }
    });
    return out;
  }
  at::Tensor out = zeros_long({images * g.N, g.Hp, g.GW, 2, g.SW, g.Wq});
  int64_t* op = out.data_ptr<int64_t>();
  // the geometry in locals (see PhaseColumns), word by word
  const int64_t H = g.H, W = g.W, GW = g.GW, plane = g.plane, word_stride = g.word_stride;
  const int64_t PT = g.PT, img_stride = g.img_stride, row_stride = g.row_stride;
  at::parallel_for(0, g.N * H, 8, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / H, ih = t % H;
      int64_t* row = op + n * img_stride + (ih + PT) * row_stride;
      for (int64_t j = 0; j < GW; ++j) {
        const int64_t* in = src + t * W * GW * 2 + 2 * j;
        int64_t* dst = row + j * word_stride;
        const uint64_t keep = maskw[j];
        PhaseColumns column(g);
        for (int64_t w = 0; w < W; ++w, in += GW * 2) {
          const uint64_t z = static_cast<uint64_t>(in[1]) & keep;
          const int64_t at = column.next();
          dst[at] = static_cast<int64_t>(static_cast<uint64_t>(in[0]) & z);
          dst[plane + at] = static_cast<int64_t>(z);
        }
      }
    }
  });
  return out;
}

// Max pooling of packed ternary activations: max over a window of values in
// {-1, 0, +1} is +1 if any is +1, else 0 if any is 0, else -1; so
// sign = OR(sign), nonzero = OR(sign) | AND(nonzero). Padding taps are skipped
// (torch pads max pooling with -inf).
at::Tensor bits_max_pool2d_op(const at::Tensor& bits_in, at::IntArrayRef kernel, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK(bits_in.scalar_type() == at::kLong && bits_in.dim() == 5 && bits_in.size(4) == 2,
              "bnnslim runtime: packed activations must be int64 [N, H, W, NW, 2]");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "bnnslim runtime: max pooling takes pairs");
  const at::Tensor bits = bits_in.contiguous();
  const int64_t N = bits.size(0), H = bits.size(1), W = bits.size(2), NW = bits.size(3);
  auto out_size = [&](int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
    const int64_t span = in + 2 * p - d * (k - 1) - 1;
    int64_t o = (ceil_mode ? ceil_div(span, s) : span / s) + 1;
    if (ceil_mode && (o - 1) * s >= in + p) --o;
    return o;
  };
  const int64_t OH = out_size(H, kernel[0], stride[0], padding[0], dilation[0]);
  const int64_t OW = out_size(W, kernel[1], stride[1], padding[1], dilation[1]);
  TORCH_CHECK(OH > 0 && OW > 0, "bnnslim runtime: max pooling window larger than the input");
  at::Tensor out = empty_long({N, OH, OW, NW, 2});
  const int64_t* src = bits.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  if (kernel[0] == 2 && kernel[1] == 2 && stride[0] == 2 && stride[1] == 2 && padding[0] == 0 && padding[1] == 0 &&
      dilation[0] == 1 && dilation[1] == 1 && 2 * OH <= H && 2 * OW <= W) {
    // the common 2x2 window, stride 2, every window inside the input: four words per output word
    at::parallel_for(0, N * OH, 8, [&](int64_t b, int64_t e) {
      const int64_t row = W * NW * 2;
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / OH, oh = t % OH;
        const uint64_t* top = reinterpret_cast<const uint64_t*>(src + (n * H + 2 * oh) * row);
        const uint64_t* bottom = top + row;
        uint64_t* o = reinterpret_cast<uint64_t*>(dst + t * OW * NW * 2);
        for (int64_t ow = 0; ow < OW; ++ow, o += 2 * NW) {
          const int64_t l = 2 * ow * NW * 2, r = l + NW * 2;
          for (int64_t j = 0; j < NW; ++j) {
            const uint64_t os = top[l + 2 * j] | top[r + 2 * j] | bottom[l + 2 * j] | bottom[r + 2 * j];
            const uint64_t az = top[l + 2 * j + 1] & top[r + 2 * j + 1] & bottom[l + 2 * j + 1] & bottom[r + 2 * j + 1];
            o[2 * j] = os;
            o[2 * j + 1] = os | az;
          }
        }
      }
    });
    return out;
  }
  // any other window: the taps inside the input, per output row and column, listed once (offsets in words)
  std::vector<std::vector<int64_t>> rows(OH), cols(OW);
  for (int64_t oh = 0; oh < OH; ++oh)
    for (int64_t kh = 0; kh < kernel[0]; ++kh) {
      const int64_t ih = oh * stride[0] - padding[0] + kh * dilation[0];
      if (ih >= 0 && ih < H) rows[oh].push_back(ih * W * NW * 2);
    }
  for (int64_t ow = 0; ow < OW; ++ow)
    for (int64_t kw = 0; kw < kernel[1]; ++kw) {
      const int64_t iw = ow * stride[1] - padding[1] + kw * dilation[1];
      if (iw >= 0 && iw < W) cols[ow].push_back(iw * NW * 2);
    }
  at::parallel_for(0, N * OH, 8, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / OH, oh = t % OH;
      const uint64_t* img = reinterpret_cast<const uint64_t*>(src + n * H * W * NW * 2);
      uint64_t* o = reinterpret_cast<uint64_t*>(dst + t * OW * NW * 2);
      for (int64_t ow = 0; ow < OW; ++ow, o += 2 * NW) {
        for (int64_t j = 0; j < NW; ++j) {
          uint64_t os = 0, az = ~uint64_t{0};
          for (const int64_t r : rows[oh])
            for (const int64_t c : cols[ow]) {
              os |= img[r + c + 2 * j];
              az &= img[r + c + 2 * j + 1];
            }
          o[2 * j] = os;
          o[2 * j + 1] = os | az;
        }
      }
    }
  });
  return out;
}

at::Tensor pack_impl(const at::Tensor& x_in, const Geo& g, const c10::optional<at::Tensor>& in_mask, int64_t isa,
                     int64_t images = 1) {
  TORCH_CHECK(x_in.device().is_cpu(), "bnnslim runtime: input must be on the CPU");
  at::Tensor x = x_in.scalar_type() == at::kFloat ? x_in : x_in.to(at::kFloat);
  const bool nhwc = x.stride(1) == 1 && x.size(1) > 1;
  if (!nhwc && x.stride(3) != 1) x = x.contiguous();
  at::Tensor out = zeros_long({images * g.N, g.Hp, g.GW, 2, g.SW, g.Wq});
  at::Tensor mask_t, maskw_t;
  const bool* mask = nullptr;
  const int64_t* maskw = nullptr;
  if (in_mask.has_value() && in_mask->defined()) {
    mask_t = as_type(*in_mask, at::kBool);
    TORCH_CHECK(mask_t.numel() == g.C, "bnnslim runtime: input mask must have one value per input channel");
    mask = mask_t.data_ptr<bool>();
    maskw_t = zeros_long({g.GW});
    auto* mw = maskw_t.data_ptr<int64_t>();
    for (int64_t c = 0; c < g.C; ++c) {
      if (mask[c]) {
        const int64_t gi = c / g.Cg, k = c % g.Cg;
        mw[gi * g.NWg + k / 64] |= static_cast<int64_t>(uint64_t{1} << (k % 64));
      }
    }
    maskw = maskw_t.data_ptr<int64_t>();
  }
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const int64_t tasks = g.N * g.H;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.C * g.W));
  at::parallel_for(0, tasks, grain, [&](int64_t b, int64_t e) {
#if BNN_X86
    if (isa == ISA_AVX512) {
      if (nhwc) pack_rows_avx512_nhwc(g, xp, sN, sH, sW, mask, maskw, op, b, e);
      else pack_rows_avx512_nchw(g, xp, sN, sC, sH, mask, op, b, e);
      return;
    }
    if (isa == ISA_AVX2) {
      if (nhwc) pack_rows_avx2_nhwc(g, xp, sN, sH, sW, maskw, op, b, e);
      else pack_rows_avx2_nchw(g, xp, sN, sC, sH, mask, op, b, e);
      return;
    }
#endif
    (void)maskw;
    pack_rows_generic(g, xp, sN, sC, sH, sW, mask, op, b, e);
  });
  return out;
}

// Floats -> packed ternary bits [N, H, W, NW, 2] (sign = x > 0, nonzero = x > 0
// or x < 0, so NaN gives 0 as in the packers above): a real layer's output
// entering a fused chain (fuse.py's PackSigns), read channels-last. With
// `positive` (a ReLU on the way: relu(x) is +1 or 0 to a binary conv) nonzero
// is x > 0 too. With a per-channel `scale` and `shift` (an eval-mode batch norm
// before the activation, folded in) the signs are those of x * scale + shift,
// mul then add in float32 (no FMA: -ffp-contract=off), as the emulation computes.
// Affine: the per-channel scale and shift, or null.
struct Affine {
  const float* scale = nullptr;
  const float* shift = nullptr;
  BNN_INLINE float operator()(float v, int64_t c) const { return scale == nullptr ? v : v * scale[c] + shift[c]; }
};

// one pixel's C floats -> its NW (sign, nonzero) word pairs
void pack_sign_words(const float* xp, int64_t C, int64_t NW, int64_t* w, bool positive, const Affine& aff) {
  for (int64_t j = 0; j < NW; ++j) {
    uint64_t sb = 0, zb = 0;
    const int64_t kmax = std::min<int64_t>(64, C - 64 * j);
    for (int64_t k = 0; k < kmax; ++k) {
      const float v = aff(xp[64 * j + k], 64 * j + k);
      sb |= static_cast<uint64_t>(v > 0.0f) << k;
      zb |= static_cast<uint64_t>(v > 0.0f || (v < 0.0f && !positive)) << k;
    }
    w[2 * j] = static_cast<int64_t>(sb);
    w[2 * j + 1] = static_cast<int64_t>(zb);
  }
}

void pack_signs_scalar(const float* x, int64_t pixels, int64_t C, int64_t NW, int64_t* out, bool positive,
                       const Affine& aff) {
  for (int64_t p = 0; p < pixels; ++p) pack_sign_words(x + p * C, C, NW, out + p * NW * 2, positive, aff);
}

#if BNN_X86
// 8 channels per compare: movemask gives a byte of sign bits and one of nonzero bits
__attribute__((target("avx2"))) void pack_signs_avx2(const float* x, int64_t pixels, int64_t C, int64_t NW,
                                                     int64_t* out, bool positive, const Affine& aff) {
  const __m256 zero = _mm256_setzero_ps();
  const int64_t C8 = C / 8 * 8;
  for (int64_t p = 0; p < pixels; ++p) {
    const float* xp = x + p * C;
    uint8_t* w = reinterpret_cast<uint8_t*>(out + p * NW * 2);
    std::memset(w, 0, NW * 16);
    int64_t c = 0;
    for (; c < C8; c += 8) {
      __m256 v = _mm256_loadu_ps(xp + c);
      if (aff.scale != nullptr)
        v = _mm256_add_ps(_mm256_mul_ps(v, _mm256_loadu_ps(aff.scale + c)), _mm256_loadu_ps(aff.shift + c));
      const int sb = _mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ));
      const int zb = positive ? sb : _mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NEQ_OQ));
      w[(c / 64) * 16 + (c % 64) / 8] = static_cast<uint8_t>(sb);
      w[(c / 64) * 16 + 8 + (c % 64) / 8] = static_cast<uint8_t>(zb);
    }
    for (; c < C; ++c) {
      const float v = aff(xp[c], c);
      w[(c / 64) * 16 + (c % 64) / 8] |= static_cast<uint8_t>((v > 0.0f) << (c % 8));
      w[(c / 64) * 16 + 8 + (c % 64) / 8] |= static_cast<uint8_t>((v > 0.0f || (v < 0.0f && !positive)) << (c % 8));
    }
  }
}
#endif

at::Tensor pack_signs_op(const at::Tensor& x_in, int64_t isa, bool positive, const c10::optional<at::Tensor>& scale,
                         const c10::optional<at::Tensor>& shift) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 4, "bnnslim runtime: pack_signs takes a 4-d CPU tensor");
  isa = resolve_isa(isa);
  const at::Tensor x = x_in.scalar_type() == at::kFloat && x_in.is_contiguous(at::MemoryFormat::ChannelsLast)
                           ? x_in
                           : x_in.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), NW = ceil_div(C, 64);
  const bool affine = scale.has_value() && scale->defined();
  TORCH_CHECK(affine == (shift.has_value() && shift->defined()), "bnnslim runtime: pack_signs takes scale and shift "
              "together");
  at::Tensor scale_t, shift_t;
  Affine aff;
  if (affine) {
    scale_t = as_type(*scale, at::kFloat);
    shift_t = as_type(*shift, at::kFloat);
    TORCH_CHECK(scale_t.numel() == C && shift_t.numel() == C,
                "bnnslim runtime: pack_signs' scale and shift must have one value per channel");
    aff.scale = scale_t.data_ptr<float>();
    aff.shift = shift_t.data_ptr<float>();
  }
  at::Tensor out = empty_long({N, H, W, NW, 2});
  const float* src = x.data_ptr<float>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, N * H, 8, [&](int64_t b, int64_t e) {
#if BNN_X86
    if (isa == ISA_AVX2 || isa == ISA_AVX512) {
      pack_signs_avx2(src + b * W * C, (e - b) * W, C, NW, dst + b * W * NW * 2, positive, aff);
      return;
    }
#endif
    pack_signs_scalar(src + b * W * C, (e - b) * W, C, NW, dst + b * W * NW * 2, positive, aff);
  });
  return out;
}

// A real conv with few input channels whose output only enters a fused chain
// (fuse.py's PackSigns over a conv): the signs of conv(x) + b as packed
// ternary bits [N, OH, OW, NW, 2], without writing the floats; or (fout set,
// fuse.py's DirectRealConv) the floats clamp(conv(x) + b, lo, hi) as NHWC
// [N, OH, OW, Cout]. x is NCHW floats, already zero-padded (the op pads it:
// no tap is ever out of range), so a tap (ky, kx, ci) of output pixel ox in a
// row is at a fixed offset from the row's first input, toff[t] + ox * sw: the
// register tiles broadcast the inputs straight from there, with no patch
// matrix copied first; w is [KH, KW, Cin, CP] with CP = Cout rounded up to 8
// (the extra channels zero, so their bits stay 0 as pack_signs leaves them);
// b is [CP]. Each output sums bias, then the taps in (ky, kx, ci) order: float
// rounding differs from torch's conv only in the last bits.
struct SignConvArgs {
  const float* x;
  const float* w;
  const float* b;
  const int64_t* toff;  // [taps]: offset of tap t = (ky, kx, ci) from a row's first input, ci * H * W + ky * W + kx
  int64_t H, W, Cin, KH, KW, sh, sw, OH, OW, CP, NW;
  int64_t* out;
  bool positive;  // nonzero = x > 0 (a ReLU after the conv), else x != 0
  float* fout;    // float output [N, OH, OW, Cout] instead of bits, or null
  int64_t Cout;
  float lo, hi;   // the float output's clamp

  float* pixel_floats(int64_t row, int64_t ox) const { return fout + (row * OW + ox) * Cout; }
  // how many of the 8 channels from c are real (not the padding up to CP)
  int lanes8(int64_t c) const { return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(8, Cout - c))); }

  int64_t taps() const { return KH * KW * Cin; }
  // the input under tap 0 of output row `row`'s first pixel
  const float* row_input(int64_t row) const { return x + (row / OH) * Cin * H * W + (row % OH) * sh * W; }
  // the output bytes of a row: per pixel NW words of sign bits then NW of nonzero bits
  uint8_t* row_bytes(int64_t row) const { return reinterpret_cast<uint8_t*>(out + row * OW * NW * 2); }
};

void conv_sign_bits_scalar(const SignConvArgs& a, int64_t row) {
  std::vector<float> acc(a.CP);
  const float* in = a.row_input(row);
  for (int64_t ox = 0; ox < a.OW; ++ox) {
    std::copy(a.b, a.b + a.CP, acc.begin());
    for (int64_t t = 0; t < a.taps(); ++t)
      for (int64_t co = 0; co < a.CP; ++co) acc[co] += in[a.toff[t] + ox * a.sw] * a.w[t * a.CP + co];
    if (a.fout != nullptr) {
      float* dst = a.pixel_floats(row, ox);
      for (int64_t co = 0; co < a.Cout; ++co) dst[co] = std::min(std::max(acc[co], a.lo), a.hi);
      continue;
    }
    pack_sign_words(acc.data(), a.CP, a.NW, a.out + (row * a.OW + ox) * a.NW * 2, a.positive, Affine{});
  }
}

// Output pixels of one row in tiles of P, then Q, then 1 (tile.run<width>(ox) computes `width` pixels from ox)
template <int P, int Q, typename Tile>
inline void sign_conv_row(int64_t OW, const Tile& tile) {
  int64_t ox = 0;
  for (; ox + P <= OW; ox += P) tile.template run<P>(ox);
  for (; ox + Q <= OW; ox += Q) tile.template run<Q>(ox);
  for (; ox < OW; ++ox) tile.template run<1>(ox);
}

// tile.run<w>(ox) for a width w known only at run time, 1 <= w <= W
template <int W, typename Tile>
inline void run_tile_of_width(const Tile& tile, int64_t ox, int64_t w) {
  if constexpr (W > 1) {
    if (w < W) return run_tile_of_width<W - 1>(tile, ox, w);
  }
  tile.template run<W>(ox);
}

// Output pixels of one row in ceil(OW / P) tiles of near-equal width (P or a little less): a narrow tile
// left over at the row's end has too few independent accumulators to hide the FMA latency (one pixel of
// two vectors: 2 chains of 4-cycle FMAs, a quarter of the FMA units' rate), and 32 = 5 x 6 + 2 x 1 pixels
// spent 16 % of NIN's first conv on those 2.
template <int P, typename Tile>
inline void sign_conv_row_even(int64_t OW, const Tile& tile) {
  const int64_t tiles = (OW + P - 1) / P, narrow = OW / tiles, narrow_tiles = tiles - OW % tiles;
  int64_t ox = 0;
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t w = i < narrow_tiles ? narrow : narrow + 1;
    run_tile_of_width<P>(tile, ox, w);
    ox += w;
  }
}

#if BNN_X86
// every register-tile loop unrolled completely, so the accumulators stay in registers (else GCC 12 stores
// each one to the stack on every iteration)
#define BNN_UNROLL _Pragma("GCC unroll 32")

// One register tile's inputs: the row's first input (SignConvArgs::row_input), the first output channel, the
// row's bytes
struct SignConvTile {
  const SignConvArgs& a;
  const float* in;
  int64_t c0;
  uint8_t* row_out;
  int64_t row;
};

// P output pixels (ox, ox + 1, ...) times NV vectors of 8 channels from c0, in registers: each weight vector
// loaded is used for P pixels, each input broadcast for NV vectors.
// UNIT: stride 1 along W (the pixels' inputs adjacent, addressed without a multiply)
template <int NV, bool UNIT>
struct SignConvTileAvx2 : SignConvTile {

  template <int P>
  __attribute__((target("avx2,fma"))) void run(int64_t ox) const {
    __m256 acc[P][NV];
    BNN_UNROLL
    for (int p = 0; p < P; ++p)
      BNN_UNROLL
      for (int v = 0; v < NV; ++v) acc[p][v] = _mm256_loadu_ps(a.b + c0 + 8 * v);
    const float* xp = in + ox * a.sw;
    const float* wp = a.w + c0;
    const int64_t* toff = a.toff;
    const int64_t taps = a.taps(), tap_step = a.CP, sw = UNIT ? 1 : a.sw;  // locals: kept in registers
    for (int64_t t = 0; t < taps; ++t, wp += tap_step) {
      const float* xt = xp + toff[t];
      __m256 wv[NV];
      BNN_UNROLL
      for (int v = 0; v < NV; ++v) wv[v] = _mm256_loadu_ps(wp + 8 * v);
      BNN_UNROLL
      for (int p = 0; p < P; ++p) {
        const __m256 xv = _mm256_broadcast_ss(xt + p * sw);
        BNN_UNROLL
        for (int v = 0; v < NV; ++v) acc[p][v] = _mm256_fmadd_ps(xv, wv[v], acc[p][v]);
      }
    }
    if (a.fout != nullptr) {
      const __m256 lo = _mm256_set1_ps(a.lo), hi = _mm256_set1_ps(a.hi);
      BNN_UNROLL
      for (int v = 0; v < NV; ++v) {
        const int n = a.lanes8(c0 + 8 * v);
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        BNN_UNROLL
        for (int p = 0; p < P; ++p) {  // max(lo, x), min(hi, x): a NaN passes through as in torch's clamp
          float* dst = a.pixel_floats(row, ox + p) + c0 + 8 * v;
          const __m256 y = _mm256_min_ps(hi, _mm256_max_ps(lo, acc[p][v]));
          if (n == 8) {
            _mm256_storeu_ps(dst, y);  // a masked store is microcoded on AMD cores: only for the last channels
          } else {
            _mm256_maskstore_ps(dst, mask, y);
          }
        }
      }
      return;
    }
    const __m256 zero = _mm256_setzero_ps();
    BNN_UNROLL
    for (int p = 0; p < P; ++p) {
      uint8_t* word = row_out + (ox + p) * a.NW * 16 + (c0 / 64) * 16;  // sign bytes, then 8 on, nonzero bytes
      BNN_UNROLL
      for (int v = 0; v < NV; ++v) {
        const int64_t byte = (c0 % 64) / 8 + v;
        word[byte] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(acc[p][v], zero, _CMP_GT_OQ)));
        word[8 + byte] = a.positive ? word[byte]
                                    : static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(acc[p][v], zero, _CMP_NEQ_OQ)));
      }
    }
  }
};

// 16 channels x 6 pixels per tile (12 accumulators, 2 weight vectors and a broadcast: 15 of the 16 registers)
template <bool UNIT>
__attribute__((target("avx2,fma"))) void conv_sign_bits_avx2(const SignConvArgs& a, int64_t row) {
  uint8_t* row_out = a.row_bytes(row);
  const float* in = a.row_input(row);
  for (int64_t c0 = 0; c0 < a.CP; c0 += 16) {
    if (a.CP - c0 >= 16) sign_conv_row_even<6>(a.OW, SignConvTileAvx2<2, UNIT>{{a, in, c0, row_out, row}});
    else sign_conv_row_even<6>(a.OW, SignConvTileAvx2<1, UNIT>{{a, in, c0, row_out, row}});
  }
}

// The same with AVX-512: NV vectors of 16 channels (masked past CP, so their bits stay 0) x P pixels.
template <int NV, bool UNIT>
struct SignConvTileAvx512 : SignConvTile {

  template <int P>
  __attribute__((target("avx512f"))) void run(int64_t ox) const {
    __mmask16 lanes[NV];
    __m512 acc[P][NV];
    BNN_UNROLL
    for (int v = 0; v < NV; ++v) {
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, a.CP - c0 - 16 * v));
      lanes[v] = static_cast<__mmask16>((1u << left) - 1u);
      const __m512 bias = _mm512_maskz_loadu_ps(lanes[v], a.b + c0 + 16 * v);
      BNN_UNROLL
      for (int p = 0; p < P; ++p) acc[p][v] = bias;
    }
    const float* xp = in + ox * a.sw;
    const float* wp = a.w + c0;
    const int64_t* toff = a.toff;
    const int64_t taps = a.taps(), tap_step = a.CP, sw = UNIT ? 1 : a.sw;  // locals: kept in registers
    for (int64_t t = 0; t < taps; ++t, wp += tap_step) {
      const float* xt = xp + toff[t];
      __m512 wv[NV];
      BNN_UNROLL
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_maskz_loadu_ps(lanes[v], wp + 16 * v);
      BNN_UNROLL
      for (int p = 0; p < P; ++p) {
        const __m512 xv = _mm512_set1_ps(xt[p * sw]);
        BNN_UNROLL
        for (int v = 0; v < NV; ++v) acc[p][v] = _mm512_fmadd_ps(xv, wv[v], acc[p][v]);
      }
    }
    if (a.fout != nullptr) {
      const __m512 lo = _mm512_set1_ps(a.lo), hi = _mm512_set1_ps(a.hi);
      BNN_UNROLL
      for (int v = 0; v < NV; ++v) {
        const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, a.Cout - c0 - 16 * v));
        const __mmask16 real = static_cast<__mmask16>((1u << n) - 1u);
        if (real == 0) continue;
        BNN_UNROLL
        for (int p = 0; p < P; ++p)
          _mm512_mask_storeu_ps(a.pixel_floats(row, ox + p) + c0 + 16 * v, real,
                                _mm512_min_ps(hi, _mm512_max_ps(lo, acc[p][v])));
      }
      return;
    }
    const __m512 zero = _mm512_setzero_ps();
    BNN_UNROLL
    for (int p = 0; p < P; ++p) {
      uint8_t* word = row_out + (ox + p) * a.NW * 16 + (c0 / 64) * 16;
      BNN_UNROLL
      for (int v = 0; v < NV; ++v) {
        if (lanes[v] == 0) continue;
        const int64_t byte = (c0 % 64) / 8 + 2 * v;  // a 16-channel group never straddles a 64-channel word
        const uint16_t sb = _mm512_cmp_ps_mask(acc[p][v], zero, _CMP_GT_OQ);
        const uint16_t zb = a.positive ? sb : _mm512_cmp_ps_mask(acc[p][v], zero, _CMP_NEQ_OQ);
        std::memcpy(word + byte, &sb, 2);
        std::memcpy(word + 8 + byte, &zb, 2);
      }
    }
  }
};

// 32 channels x 12 pixels per tile (24 accumulators, 2 weight vectors and a broadcast of the 32 registers); a
// last block of at most 16 channels is one vector wide (a masked second vector did as many multiply-adds for
// nothing: 48 filters took longer than with AVX2's 16-channel tiles)
template <bool UNIT>
__attribute__((target("avx512f"))) void conv_sign_bits_avx512(const SignConvArgs& a, int64_t row) {
  const float* in = a.row_input(row);
  for (int64_t c0 = 0; c0 < a.CP; c0 += 32) {
    if (a.CP - c0 > 16) {
      sign_conv_row<12, 4>(a.OW, SignConvTileAvx512<2, UNIT>{{a, in, c0, a.row_bytes(row), row}});
    } else {
      sign_conv_row<12, 4>(a.OW, SignConvTileAvx512<1, UNIT>{{a, in, c0, a.row_bytes(row), row}});
    }
  }
}
#endif

// x [N, C, H, W] (any strides, any floating type) -> contiguous float [N, C, H + 2 ph, W + 2 pw] with zero
// borders, by hand: ATen's zeros, narrow and copy_ cost several microseconds at batch 1 on an image this small.
at::Tensor pad_planar(const at::Tensor& x_in, int64_t ph, int64_t pw) {
  const at::Tensor x = x_in.scalar_type() == at::kFloat ? x_in : x_in.to(at::kFloat);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Hp = H + 2 * ph, Wp = W + 2 * pw;
  at::Tensor out(at::detail::empty_cpu({N, C, Hp, Wp}, at::kFloat, /*pin_memory=*/false, std::nullopt));
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  for (int64_t nc = 0; nc < N * C; ++nc) {
    float* plane = dst + nc * Hp * Wp;
    const float* in = src + (nc / C) * sN + (nc % C) * sC;
    std::memset(plane, 0, sizeof(float) * ph * Wp);
    std::memset(plane + (ph + H) * Wp, 0, sizeof(float) * ph * Wp);
    for (int64_t y = 0; y < H; ++y) {
      float* row = plane + (ph + y) * Wp;
      std::memset(row, 0, sizeof(float) * pw);
      std::memset(row + pw + W, 0, sizeof(float) * pw);
      const float* r = in + y * sH;
      if (sW == 1) std::memcpy(row + pw, r, sizeof(float) * W);
      else for (int64_t xw = 0; xw < W; ++xw) row[pw + xw] = r[xw * sW];
    }
  }
  return out;
}

// Both outputs of the small real conv: bits (fout_cout < 0) or clamped floats with fout_cout channels
at::Tensor small_conv_impl(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& b, int64_t kh, int64_t kw,
                           at::IntArrayRef stride, at::IntArrayRef padding, int64_t isa, bool positive,
                           int64_t fout_cout, double lo, double hi) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 4, "bnnslim runtime: conv_sign_bits takes a 4-d CPU tensor");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2, "bnnslim runtime: conv_sign_bits takes 2-d stride, padding");
  isa = resolve_isa(isa);
  const int64_t N = x_in.size(0), Cin = x_in.size(1), ph = padding[0], pw = padding[1];
  const int64_t H = x_in.size(2) + 2 * ph, W = x_in.size(3) + 2 * pw, CP = w.size(3);
  const at::Tensor x = pad_planar(x_in, ph, pw);  // NCHW floats with the zero padding written out
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 4 && w.size(0) == kh &&
                  w.size(1) == kw && w.size(2) == Cin && CP % 8 == 0,
              "bnnslim runtime: conv_sign_bits weights must be float [kh, kw, Cin, Cout rounded up to 8]");
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.is_contiguous() && b.numel() == CP,
              "bnnslim runtime: conv_sign_bits bias must be float [Cout rounded up to 8]");
  TORCH_CHECK((fout_cout <= CP && fout_cout > CP - 8) || fout_cout < 0,
              "bnnslim runtime: conv_small_float's out_channels do not match the weights");
  const int64_t OH = (H - kh) / stride[0] + 1, OW = (W - kw) / stride[1] + 1;
  TORCH_CHECK(H >= kh && W >= kw, "bnnslim runtime: conv_sign_bits output would be empty");
  const int64_t NW = ceil_div(CP, 64);
  const bool floats = fout_cout >= 0;
  // floats: NHWC memory, returned as the [N, Cout, OH, OW] view (channels-last strides)
  at::Tensor out = floats ? at::empty({N, OH, OW, fout_cout}, x_in.options().dtype(at::kFloat))
                          : empty_long({N, OH, OW, NW, 2});
  std::vector<int64_t> toff;
  toff.reserve(kh * kw * Cin);
  for (int64_t ky = 0; ky < kh; ++ky)
    for (int64_t kx = 0; kx < kw; ++kx)
      for (int64_t ci = 0; ci < Cin; ++ci) toff.push_back(ci * H * W + ky * W + kx);
  const SignConvArgs a{x.data_ptr<float>(), w.data_ptr<float>(), b.data_ptr<float>(), toff.data(), H, W, Cin, kh,
                       kw, stride[0], stride[1], OH, OW, CP, NW, floats ? nullptr : out.data_ptr<int64_t>(),
                       positive, floats ? out.data_ptr<float>() : nullptr, fout_cout, static_cast<float>(lo),
                       static_cast<float>(hi)};
  const bool unit = stride[1] == 1;
  at::parallel_for(0, N * OH, 4, [&](int64_t rb, int64_t re) {
    for (int64_t row = rb; row < re; ++row) {
      if (!floats) std::memset(a.row_bytes(row), 0, OW * NW * 16);
#if BNN_X86
      if (isa == ISA_AVX512) {
        unit ? conv_sign_bits_avx512<true>(a, row) : conv_sign_bits_avx512<false>(a, row);
        continue;
      }
      if (isa == ISA_AVX2 && __builtin_cpu_supports("fma")) {
        unit ? conv_sign_bits_avx2<true>(a, row) : conv_sign_bits_avx2<false>(a, row);
        continue;
      }
#endif
      conv_sign_bits_scalar(a, row);
    }
  });
  return floats ? out.permute({0, 3, 1, 2}) : out;
}

at::Tensor conv_sign_bits_op(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& b, int64_t kh, int64_t kw,
                             at::IntArrayRef stride, at::IntArrayRef padding, int64_t isa, bool positive) {
  return small_conv_impl(x_in, w, b, kh, kw, stride, padding, isa, positive, -1, 0.0, 0.0);
}

at::Tensor conv_small_float_op(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& b, int64_t kh,
                               int64_t kw, at::IntArrayRef stride, at::IntArrayRef padding, int64_t isa,
                               int64_t out_channels, double lo, double hi) {
  return small_conv_impl(x_in, w, b, kh, kw, stride, padding, isa, false, out_channels, lo, hi);
}

// Global average pooling of float32 [N, C, L] (any strides): each channel's values summed in position order in
// float32, then divided by L. tails.py's fallback sums in the same order, so both give the same floats; ATen's
// mean (a vectorised reduction, whose order is its own) costs about 3 us at batch 1 for a few hundred numbers.
at::Tensor pooled_mean(const at::Tensor& v) {
  const int64_t N = v.size(0), C = v.size(1), L = v.size(2);
  const int64_t sN = v.stride(0), sC = v.stride(1), sL = v.stride(2);
  at::Tensor out = at::empty({N, C}, v.options());
  const float* src = v.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  std::vector<float> acc(C);
  for (int64_t n = 0; n < N; ++n) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t l = 0; l < L; ++l) {
      const float* at = src + n * sN + l * sL;
      for (int64_t c = 0; c < C; ++c) acc[c] += at[c * sC];
    }
    for (int64_t c = 0; c < C; ++c) dst[n * C + c] = acc[c] / static_cast<float>(L);
  }
  return out;
}

// A network's tail, global average pooling then (optionally) a linear layer, in one call: at batch 1 the
// three torch modules it replaces (pool, flatten, linear) cost about 20 us from Python, this call a few.
// x is [N, C, H, W] (any memory format) or [N, C * L] (flattened after the pooling's place, C-major); the
// result is the mean over the spatial positions (pooled_mean for float32), then ATen's addmm x w^T + b, which
// the fallback's F.linear also calls.
at::Tensor pooled_linear_op(const at::Tensor& x, const c10::optional<at::Tensor>& w,
                            const c10::optional<at::Tensor>& b, int64_t channels) {
  TORCH_CHECK(x.dim() == 4 || (x.dim() == 2 && channels > 0 && x.size(1) % channels == 0),
              "bnnslim runtime: pooled_linear takes [N, C, H, W] or [N, C * L] inputs");
  const at::Tensor positions = x.dim() == 4 ? x.flatten(2) : x.reshape({x.size(0), channels, -1});
  const at::Tensor pooled = positions.scalar_type() == at::kFloat && positions.size(2) > 0 ? pooled_mean(positions)
                                                                                         : positions.mean(2);
  if (!w.has_value()) return pooled;
  const at::Tensor w2 = w->dim() == 4 ? w->reshape({w->size(0), -1}) : *w;  // a 1x1 conv's [O, C, 1, 1]
  return b.has_value() ? at::addmm(*b, pooled, w2.t()) : at::mm(pooled, w2.t());
}

// ---------------------------------------------------------------- conv

struct ConvArgs {
  const Geo* g;
  const int64_t* act;   // packed activations
  const int64_t* wts;   // packed weights [G, OBg, KH, KW, NWg, NB]
  const float* alpha;   // [O] or null
  const float* bias;    // [O] or null
  float* out;           // [N, O, OH, OW] float, or
  int32_t* counts;      // [N, O, OH, OW] int32
  const int64_t* offs;  // [KH*KW*NWg] word offset of each (tap, word), weight order
  int64_t kk;           // KH*KW*NWg
  bool nhwc;            // output in channels-last memory order (as the input was)
  const int32_t* thr;   // [O, 3] (a, b, flip) output thresholds, or null (see finish_one)
  int64_t* bits;        // [N, OH, OW, NWo, 2] packed ternary output when thr is set (zeroed)
  int64_t NWo;          // words per output pixel: ceil(O / 64)
  const int16_t* thr16 = nullptr;  // thresholds as 16-bit lanes for conv_avx2_short (see short_thresholds)
  const int64_t* wnib = nullptr;   // for conv_avx2_short: [G, OBg, kk, 2, NB] weights' low then high nibbles
  const int64_t* wor = nullptr;    // for conv_avx2_short: [G, kk] OR of a group's weights per word
  const int64_t* wpop = nullptr;   // for conv_avx2_short: [G, OBg, kk, 2] popcounts of a block's words (16-bit)
  const int16_t* thr_blocks = nullptr;  // [G * OBg, 2, 8] thresholds a, b per weight block (block_thresholds)
  const uint8_t* flip_blocks = nullptr;  // [G * OBg] the block's flip bits
};

// Offset (in words) of tap (kh, kw), packed word j, relative to the word of
// output pixel (oh, ow) at (oh*SH, ow) in the phase layout.
inline int64_t tap_offset(const Geo& g, int64_t kh, int64_t kw, int64_t j) {
  const int64_t cw = kw * g.DW;
  return kh * g.DH * g.row_stride + j * g.word_stride + (cw % g.SW) * g.Wq + cw / g.SW;
}

// Thresholded output: lo = dot < a, hi = dot >= b; the value is 0 between, and
// outside it +1 on the hi side (flip = 0) or on the lo side (flip = 1). Bits:
// nonzero = lo | hi, sign = flip ? lo : hi (see bnnslim/runtime/fuse.py).
inline void finish_one(const ConvArgs& a, int64_t n, int64_t o, int64_t pix, int64_t dot) {
  const Geo& g = *a.g;
  if (a.thr != nullptr) {
    const int32_t* t = a.thr + 3 * o;
    const bool lo = dot < t[0], hi = dot >= t[1];
    const bool s = t[2] ? lo : hi;
    int64_t* w = a.bits + ((n * g.OH * g.OW + pix) * a.NWo + o / 64) * 2;
    const uint64_t bit = uint64_t{1} << (o % 64);
    if (s) w[0] = static_cast<int64_t>(static_cast<uint64_t>(w[0]) | bit);
    if (lo || hi) w[1] = static_cast<int64_t>(static_cast<uint64_t>(w[1]) | bit);
    return;
  }
  const int64_t at = a.nhwc ? (n * g.OH * g.OW + pix) * g.O + o : (n * g.O + o) * g.OH * g.OW + pix;
  if (a.counts != nullptr) {
    a.counts[at] = static_cast<int32_t>(dot);
  } else {
    float y = static_cast<float>(dot);
    if (a.alpha != nullptr) y = y * a.alpha[o];
    if (a.bias != nullptr) y = y + a.bias[o];
    a.out[at] = y;
  }
}

// All NB (or nvalid) channels of a weight block at one pixel: a byte of bits
// (thresholds, block on a byte boundary), or contiguous channels-last values.
inline void finish_block(const ConvArgs& a, int64_t n, int64_t oc0, int nvalid, int64_t pix, const int64_t* dots) {
  const Geo& g = *a.g;
  if (a.thr != nullptr && oc0 % 8 == 0) {
    uint32_t sb = 0, zb = 0;
    for (int o = 0; o < nvalid; ++o) {
      const int32_t* t = a.thr + 3 * (oc0 + o);
      const uint32_t lo = dots[o] < t[0], hi = dots[o] >= t[1];
      sb |= (t[2] ? lo : hi) << o;
      zb |= (lo | hi) << o;
    }
    uint8_t* w = reinterpret_cast<uint8_t*>(a.bits + ((n * g.OH * g.OW + pix) * a.NWo + oc0 / 64) * 2);
    w[(oc0 % 64) / 8] = static_cast<uint8_t>(sb);
    w[8 + (oc0 % 64) / 8] = static_cast<uint8_t>(zb);
    return;
  }
  if (a.thr == nullptr && a.nhwc) {
    const int64_t at = (n * g.OH * g.OW + pix) * g.O + oc0;
    if (a.counts != nullptr) {
      for (int o = 0; o < nvalid; ++o) a.counts[at + o] = static_cast<int32_t>(dots[o]);
      return;
    }
    float* y = a.out + at;
    for (int o = 0; o < nvalid; ++o) {
      float v = static_cast<float>(dots[o]);
      if (a.alpha != nullptr) v = v * a.alpha[oc0 + o];
      if (a.bias != nullptr) v = v + a.bias[oc0 + o];
      y[o] = v;
    }
    return;
  }
  for (int o = 0; o < nvalid; ++o) finish_one(a, n, oc0 + o, pix, dots[o]);
}

// Portable kernel: one output pixel at a time, NB channels of a weight block.
// With HW_POPCNT the caller carries target("popcnt") and the builtin becomes one
// instruction; without, a branch-free SWAR count (not a libgcc call).
template <bool HW_POPCNT>
BNN_INLINE int popc(uint64_t v) {
#if BNN_X86
  if constexpr (HW_POPCNT) return __builtin_popcountll(v);
#endif
  v = v - ((v >> 1) & 0x5555555555555555ULL);
  v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
  v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
  return static_cast<int>((v * 0x0101010101010101ULL) >> 56);
}

template <bool HW_POPCNT>
BNN_INLINE void conv_scalar_body(const ConvArgs& a, int64_t n, int64_t gi, int64_t pix_begin, int64_t pix_end) {
  const Geo& g = *a.g;
  const int64_t* img = a.act + n * g.img_stride + gi * g.NWg * g.word_stride;
  for (int64_t pix = pix_begin; pix < pix_end; ++pix) {
    const int64_t oh = pix / g.OW, ow = pix % g.OW;
    const int64_t* base = img + oh * g.SH * g.row_stride + ow;
    int64_t valid = 0;
    for (int64_t i = 0; i < a.kk; ++i) valid += popc<HW_POPCNT>(static_cast<uint64_t>(base[a.offs[i] + g.plane]));
    for (int64_t ob = 0; ob < g.OBg; ++ob) {
      const int64_t* wb = a.wts + (gi * g.OBg + ob) * a.kk * NB;
      int64_t acc[NB] = {0};
      for (int64_t i = 0; i < a.kk; ++i, wb += NB) {
        const uint64_t s = static_cast<uint64_t>(base[a.offs[i]]);
        const uint64_t z = static_cast<uint64_t>(base[a.offs[i] + g.plane]);
        for (int64_t l = 0; l < NB; ++l) acc[l] += popc<HW_POPCNT>((s ^ static_cast<uint64_t>(wb[l])) & z);
      }
      int64_t dots[NB];
      for (int64_t l = 0; l < NB; ++l) dots[l] = valid - 2 * acc[l];
      finish_block(a, n, gi * g.Og + ob * NB, static_cast<int>(std::min<int64_t>(NB, g.Og - ob * NB)), pix, dots);
    }
  }
}

void conv_scalar(const ConvArgs& a, int64_t n, int64_t gi, int64_t pb, int64_t pe) {
  conv_scalar_body<false>(a, n, gi, pb, pe);
}

#if BNN_X86
BNN_POPCNT void conv_popcnt(const ConvArgs& a, int64_t n, int64_t gi, int64_t pb, int64_t pe) {
  conv_scalar_body<true>(a, n, gi, pb, pe);
}

// bit 8i+j -> bit 8j+i (an 8x8 bit matrix, one row per byte)
inline uint64_t transpose_bits8x8(uint64_t x) {
  x = (x & 0xAA55AA55AA55AA55ULL) | ((x & 0x00AA00AA00AA00AAULL) << 7) | ((x >> 7) & 0x00AA00AA00AA00AAULL);
  x = (x & 0xCCCC3333CCCC3333ULL) | ((x & 0x0000CCCC0000CCCCULL) << 14) | ((x >> 14) & 0x0000CCCC0000CCCCULL);
  x = (x & 0xF0F0F0F00F0F0F0FULL) | ((x & 0x00000000F0F0F0F0ULL) << 28) | ((x >> 28) & 0x00000000F0F0F0F0ULL);
  return x;
}

// r[i][j] -> r[j][i] for an 8x8 block of floats
BNN_AVX512 inline void transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Thresholded outputs of short dot products (kk <= SHORT_WORDS: |dot| < 4096), pixel lanes. Per-output compares,
// mask shuffles and a bit transpose cost more than a 1x1 conv's popcounts (and vector shuffles would crowd the one
// port that also runs vpopcntq), so the counts of 4 channels travel as the 16-bit quarters of each pixel's 64-bit
// lane (lane 4 * pixel + channel: shifts and ors), two compares per vector give each pixel a nibble of lo and hi
// bits, and pdep interleaves the nibbles of channels 0-3 and 4-7 into one byte per pixel: no transpose.
BNN_AVX512 BNN_INLINE __m512i quarters16_avx512(__m512i a, __m512i b, __m512i c, __m512i d) {  // each < 2^16
  return _mm512_or_si512(_mm512_or_si512(a, _mm512_slli_epi64(b, 16)),
                         _mm512_or_si512(_mm512_slli_epi64(c, 32), _mm512_slli_epi64(d, 48)));
}

// acc[o]: channel o's popcounts over the 8 pixels; valid16: quarters16_avx512 of the valid counts; out: the packed
// bits of the tile's first pixel. Writes, for each of the nl pixels, the block's byte of sign and of nonzero bits.
BNN_AVX512 BNN_INLINE void finish_bits_short_avx512(const ConvArgs& a, int64_t block, int64_t oc0, int64_t* out,
                                                    int nl, __m512i valid16, const __m512i* acc) {
  const int64_t* t = reinterpret_cast<const int64_t*>(a.thr_blocks + 2 * NB * block);  // a0-3, a4-7, b0-3, b4-7
  const __m512i c03 = quarters16_avx512(acc[0], acc[1], acc[2], acc[3]);
  const __m512i c47 = quarters16_avx512(acc[4], acc[5], acc[6], acc[7]);
  const __m512i dot03 = _mm512_sub_epi16(valid16, _mm512_add_epi16(c03, c03));
  const __m512i dot47 = _mm512_sub_epi16(valid16, _mm512_add_epi16(c47, c47));
  constexpr uint64_t LOW = 0x0F0F0F0F0F0F0F0FULL, HIGH = 0xF0F0F0F0F0F0F0F0ULL;
  const uint64_t lo = _pdep_u64(_mm512_cmplt_epi16_mask(dot03, _mm512_set1_epi64(t[0])), LOW) |
                      _pdep_u64(_mm512_cmplt_epi16_mask(dot47, _mm512_set1_epi64(t[1])), HIGH);
  const uint64_t hi = _pdep_u64(_mm512_cmpge_epi16_mask(dot03, _mm512_set1_epi64(t[2])), LOW) |
                      _pdep_u64(_mm512_cmpge_epi16_mask(dot47, _mm512_set1_epi64(t[3])), HIGH);
  const uint64_t flip = a.flip_blocks[block] * 0x0101010101010101ULL;
  const uint64_t sign = (lo & flip) | (hi & ~flip), nonzero = lo | hi;
  uint8_t* w = reinterpret_cast<uint8_t*>(out + (oc0 / 64) * 2) + (oc0 % 64) / 8;
  const int64_t stride = a.NWo * 16;  // bytes per output pixel
  for (int l = 0; l < nl; ++l, w += stride) {
    w[0] = static_cast<uint8_t>(sign >> (8 * l));
    w[8] = static_cast<uint8_t>(nonzero >> (8 * l));
  }
}

// ---- AVX-512 VPOPCNTDQ: lanes are 8 consecutive output pixels of a row; a
// tile holds NP such vectors; a weight block gives 8 output channels.
// Per (tap, word): 2*NP loads, 8 broadcasts, 8*NP x (ternlog, popcnt, add).
template <int NP>
BNN_AVX512 void tile_avx512(const ConvArgs& a, int64_t n, int64_t gi, int64_t v0) {
  const Geo& g = *a.g;
  const int64_t vpr = ceil_div(g.OW, 8);  // vectors per output row
  const int64_t* img = a.act + n * g.img_stride + gi * g.NWg * g.word_stride;
  const int64_t* offs = a.offs;
  const int64_t kk = a.kk;
  const int64_t* base[NP];
  int64_t pix0[NP];
  __mmask8 lanes[NP];
  for (int p = 0; p < NP; ++p) {
    const int64_t oh = (v0 + p) / vpr, ow0 = ((v0 + p) % vpr) * 8;
    base[p] = img + oh * g.SH * g.row_stride + ow0;
    pix0[p] = oh * g.OW + ow0;
    lanes[p] = static_cast<__mmask8>((1u << std::min<int64_t>(8, g.OW - ow0)) - 1u);
  }
  // valid (nonzero) input count per output pixel, shared by all channel blocks
  __m512i valid[NP];
  for (int p = 0; p < NP; ++p) valid[p] = _mm512_setzero_si512();
  for (int64_t i = 0; i < kk; ++i) {
    const int64_t off = offs[i] + g.plane;
    for (int p = 0; p < NP; ++p)
      valid[p] = _mm512_add_epi64(valid[p], _mm512_popcnt_epi64(_mm512_loadu_si512(base[p] + off)));
  }
  const int64_t plane = g.plane;
  __m512i valid16[NP];  // for finish_bits_short_avx512: each pixel's valid count in the 4 quarters of its lane
  if (a.thr_blocks != nullptr)
    for (int p = 0; p < NP; ++p) valid16[p] = quarters16_avx512(valid[p], valid[p], valid[p], valid[p]);
  for (int64_t ob = 0; ob < g.OBg; ++ob) {
    const int64_t* wb = a.wts + (gi * g.OBg + ob) * kk * NB;
    __m512i acc[NB][NP];
    for (int o = 0; o < NB; ++o)
      for (int p = 0; p < NP; ++p) acc[o][p] = _mm512_setzero_si512();
    for (int64_t i = 0; i < kk; ++i, wb += NB) {
      const int64_t off = offs[i];
      __m512i s[NP], z[NP];
      for (int p = 0; p < NP; ++p) {
        s[p] = _mm512_loadu_si512(base[p] + off);
        z[p] = _mm512_loadu_si512(base[p] + off + plane);
      }
      for (int o = 0; o < NB; ++o) {
        const __m512i w = _mm512_set1_epi64(wb[o]);
        for (int p = 0; p < NP; ++p) {
          // (s ^ w) & z  ==  ternlog(s, w, z, 0x28)
          const __m512i t = _mm512_ternarylogic_epi64(s[p], w, z[p], 0x28);
          acc[o][p] = _mm512_add_epi64(acc[o][p], _mm512_popcnt_epi64(t));
        }
      }
    }
    const int64_t oc0 = gi * g.Og + ob * NB;
    const int nvalid_o = static_cast<int>(std::min<int64_t>(NB, g.Og - ob * NB));
    if (a.thr != nullptr) {
      for (int p = 0; p < NP; ++p) {
        const int nl = __builtin_popcount(lanes[p]);
        if (a.thr_blocks != nullptr && oc0 % 8 == 0) {
          __m512i accp[NB];
          for (int o = 0; o < NB; ++o) accp[o] = acc[o][p];
          finish_bits_short_avx512(a, gi * g.OBg + ob, oc0, a.bits + (n * g.OH * g.OW + pix0[p]) * a.NWo * 2, nl,
                                   valid16[p], accp);
          continue;
        }
        if (oc0 % 8 != 0) {  // a block that straddles bytes (grouped outputs): bit by bit
          alignas(64) int64_t d[8];
          for (int o = 0; o < nvalid_o; ++o) {
            _mm512_store_si512(d, _mm512_sub_epi64(valid[p], _mm512_slli_epi64(acc[o][p], 1)));
            for (int l = 0; l < nl; ++l) finish_one(a, n, oc0 + o, pix0[p] + l, d[l]);
          }
          continue;
        }
        uint64_t ms = 0, mz = 0;  // byte o: channel o's bits over the 8 pixels
        for (int o = 0; o < nvalid_o; ++o) {
          const int32_t* t = a.thr + 3 * (oc0 + o);
          const __m512i dot = _mm512_sub_epi64(valid[p], _mm512_slli_epi64(acc[o][p], 1));
          const __mmask8 lo = _mm512_cmplt_epi64_mask(dot, _mm512_set1_epi64(t[0]));
          const __mmask8 hi = _mm512_cmpge_epi64_mask(dot, _mm512_set1_epi64(t[1]));
          ms |= static_cast<uint64_t>(t[2] ? lo : hi) << (8 * o);
          mz |= static_cast<uint64_t>(lo | hi) << (8 * o);
        }
        ms = transpose_bits8x8(ms);  // byte l: pixel l's bits over the 8 channels
        mz = transpose_bits8x8(mz);
        for (int l = 0; l < nl; ++l) {
          uint8_t* w = reinterpret_cast<uint8_t*>(a.bits + ((n * g.OH * g.OW + pix0[p] + l) * a.NWo + oc0 / 64) * 2);
          w[(oc0 % 64) / 8] = static_cast<uint8_t>(ms >> (8 * l));
          w[8 + (oc0 % 64) / 8] = static_cast<uint8_t>(mz >> (8 * l));
        }
      }
      continue;
    }
    if (a.nhwc) {
      // 8 channels x 8 pixels -> transpose -> 8 consecutive channels per pixel
      const __mmask8 omask = static_cast<__mmask8>((1u << nvalid_o) - 1u);
      for (int p = 0; p < NP; ++p) {
        __m256 r[NB];
        for (int o = 0; o < NB; ++o) {
          const __m512i dot = _mm512_sub_epi64(valid[p], _mm512_slli_epi64(acc[o][p], 1));
          if (a.counts != nullptr) {
            r[o] = _mm256_castsi256_ps(_mm512_cvtepi64_epi32(dot));
          } else {
            __m256 y = _mm512_cvtepi64_ps(dot);
            if (o < nvalid_o) {
              if (a.alpha != nullptr) y = _mm256_mul_ps(y, _mm256_set1_ps(a.alpha[oc0 + o]));
              if (a.bias != nullptr) y = _mm256_add_ps(y, _mm256_set1_ps(a.bias[oc0 + o]));
            }
            r[o] = y;
          }
        }
        transpose8x8(r);
        const int nl = __builtin_popcount(lanes[p]);
        for (int l = 0; l < nl; ++l) {
          const int64_t at = (n * g.OH * g.OW + pix0[p] + l) * g.O + oc0;
          if (a.counts != nullptr) {
            _mm256_mask_storeu_epi32(a.counts + at, omask, _mm256_castps_si256(r[l]));
          } else {
            _mm256_mask_storeu_ps(a.out + at, omask, r[l]);
          }
        }
      }
      continue;
    }
    for (int o = 0; o < nvalid_o; ++o) {
      const int64_t oc = oc0 + o;
      const int64_t at0 = (n * g.O + oc) * g.OH * g.OW;
      for (int p = 0; p < NP; ++p) {
        const __m512i dot = _mm512_sub_epi64(valid[p], _mm512_slli_epi64(acc[o][p], 1));
        if (a.counts != nullptr) {
          _mm256_mask_storeu_epi32(a.counts + at0 + pix0[p], lanes[p], _mm512_cvtepi64_epi32(dot));
        } else {
          __m256 y = _mm512_cvtepi64_ps(dot);
          if (a.alpha != nullptr) y = _mm256_mul_ps(y, _mm256_set1_ps(a.alpha[oc]));
          if (a.bias != nullptr) y = _mm256_add_ps(y, _mm256_set1_ps(a.bias[oc]));
          _mm256_mask_storeu_ps(a.out + at0 + pix0[p], lanes[p], y);
        }
      }
    }
  }
}

constexpr int NP512 = 2;

BNN_AVX512 void conv_avx512(const ConvArgs& a, int64_t n, int64_t gi, int64_t vb, int64_t ve) {
  int64_t v = vb;
  for (; v + NP512 <= ve; v += NP512) tile_avx512<NP512>(a, n, gi, v);
  for (; v < ve; ++v) tile_avx512<1>(a, n, gi, v);
}

// The epilogue of channel lanes, vectorised: each pixel's 8 dot products (one per lane) become a byte of sign
// and a byte of nonzero bits (two compares against the block's thresholds, the flip as a mask), or 8 consecutive
// channels-last floats or counts (mul then add, as finish_one). The block starts on a byte (oc0 % 8 == 0).
BNN_AVX512 BNN_INLINE void finish_lanes_avx512(const ConvArgs& a, int64_t n, int64_t oc0, int nvalid, int64_t p0,
                                               int P, const int64_t* valid, const __m512i* acc) {
  const Geo& g = *a.g;
  const __mmask8 omask = static_cast<__mmask8>((1u << nvalid) - 1u);
  if (a.thr != nullptr) {
    // thresholds of the block's channels as int64 lanes: a (lo = dot < a), b (hi = dot >= b), and the flips
    const int32_t* t = a.thr + 3 * oc0;
    alignas(64) int64_t av[NB], bv[NB];
    uint32_t flip = 0;
    for (int o = 0; o < NB; ++o) {
      av[o] = o < nvalid ? t[3 * o] : 0;
      bv[o] = o < nvalid ? t[3 * o + 1] : 0;
      flip |= static_cast<uint32_t>(o < nvalid && t[3 * o + 2] != 0) << o;
    }
    const __m512i va = _mm512_load_si512(av), vb = _mm512_load_si512(bv);
    uint8_t* out = reinterpret_cast<uint8_t*>(a.bits) + (oc0 % 64) / 8;
    for (int p = 0; p < P; ++p) {
      const __m512i dot = _mm512_sub_epi64(_mm512_set1_epi64(valid[p]), _mm512_slli_epi64(acc[p], 1));
      const uint32_t lo = _mm512_mask_cmplt_epi64_mask(omask, dot, va);
      const uint32_t hi = _mm512_mask_cmpge_epi64_mask(omask, dot, vb);
      uint8_t* w = out + ((n * g.OH * g.OW + p0 + p) * a.NWo + oc0 / 64) * 16;
      w[0] = static_cast<uint8_t>((lo & flip) | (hi & ~flip));
      w[8] = static_cast<uint8_t>(lo | hi);
    }
    return;
  }
  __m256 alpha = _mm256_set1_ps(1.0f), bias = _mm256_setzero_ps();
  if (a.counts == nullptr) {
    if (a.alpha != nullptr) alpha = _mm256_maskz_loadu_ps(omask, a.alpha + oc0);
    if (a.bias != nullptr) bias = _mm256_maskz_loadu_ps(omask, a.bias + oc0);
  }
  for (int p = 0; p < P; ++p) {
    const __m512i dot = _mm512_sub_epi64(_mm512_set1_epi64(valid[p]), _mm512_slli_epi64(acc[p], 1));
    const int64_t at = (n * g.OH * g.OW + p0 + p) * g.O + oc0;
    if (a.counts != nullptr) {
      _mm256_mask_storeu_epi32(a.counts + at, omask, _mm512_cvtepi64_epi32(dot));
      continue;
    }
    __m256 y = _mm512_cvtepi64_ps(dot);
    if (a.alpha != nullptr) y = _mm256_mul_ps(y, alpha);
    if (a.bias != nullptr) y = _mm256_add_ps(y, bias);
    _mm256_mask_storeu_ps(a.out + at, omask, y);
  }
}

// ---- AVX-512, channel lanes: lanes are the 8 output channels of a weight block
// (one load), each output pixel's word is broadcast. For narrow outputs (a few
// pixels per row, the late layers of a small image) where pixel lanes would sit
// mostly empty. A tile is P consecutive output pixels (row-major, any rows).
template <int P>
BNN_AVX512 void tile_avx512_ch(const ConvArgs& a, int64_t n, int64_t gi, int64_t p0) {
  const Geo& g = *a.g;
  const int64_t* img = a.act + n * g.img_stride + gi * g.NWg * g.word_stride;
  const int64_t* offs = a.offs;
  const int64_t kk = a.kk, plane = g.plane;
  const int64_t* base[P];
  int64_t valid[P];
  for (int p = 0; p < P; ++p) {
    const int64_t oh = (p0 + p) / g.OW, ow = (p0 + p) % g.OW;
    base[p] = img + oh * g.SH * g.row_stride + ow;
    int64_t v = 0;
    for (int64_t i = 0; i < kk; ++i) v += __builtin_popcountll(static_cast<uint64_t>(base[p][offs[i] + plane]));
    valid[p] = v;
  }
  for (int64_t ob = 0; ob < g.OBg; ++ob) {
    const int64_t* wb = a.wts + (gi * g.OBg + ob) * kk * NB;
    __m512i acc[P];
    for (int p = 0; p < P; ++p) acc[p] = _mm512_setzero_si512();
    for (int64_t i = 0; i < kk; ++i) {
      const __m512i w = _mm512_loadu_si512(wb + i * NB);
      const int64_t off = offs[i];
      for (int p = 0; p < P; ++p) {
        const __m512i t = _mm512_ternarylogic_epi64(_mm512_set1_epi64(base[p][off]), w,
                                                    _mm512_set1_epi64(base[p][off + plane]), 0x28);
        acc[p] = _mm512_add_epi64(acc[p], _mm512_popcnt_epi64(t));
      }
    }
    const int64_t oc0 = gi * g.Og + ob * NB;
    const int nvalid = static_cast<int>(std::min<int64_t>(NB, g.Og - ob * NB));
    if (oc0 % 8 == 0 && (a.thr != nullptr || a.nhwc)) {
      finish_lanes_avx512(a, n, oc0, nvalid, p0, P, valid, acc);
      continue;
    }
    for (int p = 0; p < P; ++p) {
      alignas(64) int64_t dots[NB];
      _mm512_store_si512(dots, _mm512_sub_epi64(_mm512_set1_epi64(valid[p]), _mm512_slli_epi64(acc[p], 1)));
      finish_block(a, n, oc0, nvalid, p0 + p, dots);
    }
  }
}

constexpr int NPCH = 8;  // pixels per channel-lane tile

BNN_AVX512 void conv_avx512_ch(const ConvArgs& a, int64_t n, int64_t gi, int64_t pb, int64_t pe) {
  int64_t p = pb;
  for (; p + NPCH <= pe; p += NPCH) tile_avx512_ch<NPCH>(a, n, gi, p);
  for (; p < pe; ++p) tile_avx512_ch<1>(a, n, gi, p);
}

// Channel lanes fill better than pixel lanes: the share of used lanes, compared.
inline bool use_channel_lanes(const Geo& g) {
  const double pixel_fill = static_cast<double>(g.OW) / static_cast<double>(ceil_div(g.OW, 8) * 8);
  const double channel_fill = static_cast<double>(g.Og) / static_cast<double>(ceil_div(g.Og, 8) * 8);
  return channel_fill > pixel_fill;
}

// ---- AVX2: lanes are 4 pixels; popcount by nibble lookup (pshufb) into byte
// counters, folded into 64-bit counters with psadbw every 31 words.
// pshufb's table: the popcount of each nibble value 0-15, in both 128-bit lanes
BNN_AVX2 inline __m256i nibble_popcounts_avx2() {
  return _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
}

BNN_AVX2 inline __m256i popcnt_bytes_avx2(__m256i v) {
  const __m256i lut = nibble_popcounts_avx2();
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low));
  const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
  return _mm256_add_epi8(lo, hi);
}

// Per lane (pixel), the nonzero input bits over all kk words: byte counters folded every 31 words.
BNN_AVX2 BNN_INLINE __m256i nonzero_counts_avx2(const int64_t* base, const int64_t* offs, int64_t kk, int64_t plane) {
  const __m256i zero = _mm256_setzero_si256();
  __m256i valid = zero, vbytes = zero;
  for (int64_t i = 0; i < kk; ++i) {
    vbytes = _mm256_add_epi8(vbytes, popcnt_bytes_avx2(_mm256_loadu_si256(
                                         reinterpret_cast<const __m256i*>(base + offs[i] + plane))));
    if ((i + 1) % 31 == 0 || i + 1 == kk) {
      valid = _mm256_add_epi64(valid, _mm256_sad_epu8(vbytes, zero));
      vbytes = zero;
    }
  }
  return valid;
}

// Byte counters of popcount((s ^ w) & z) for the 8 channels of a weight block over words i0..i1 (at most
// 31: a byte holds 8 per word); wb points at word i0's 8 weights.
BNN_AVX2 BNN_INLINE void xnor_bytes_avx2(const int64_t* base, const int64_t* offs, int64_t i0, int64_t i1,
                                         int64_t plane, const int64_t* wb, __m256i* bytes) {
  for (int o = 0; o < NB; ++o) bytes[o] = _mm256_setzero_si256();
  for (int64_t i = i0; i < i1; ++i, wb += NB) {
    const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + offs[i]));
    const __m256i z = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + offs[i] + plane));
    for (int o = 0; o < NB; ++o)
      bytes[o] = _mm256_add_epi8(
          bytes[o], popcnt_bytes_avx2(_mm256_and_si256(_mm256_xor_si256(s, _mm256_set1_epi64x(wb[o])), z)));
  }
}

// Short dot products (kk <= SHORT_WORDS = 62 words: 1x1 convs, 3x3 up to 384 channels; with AVX2 up to
// AVX2_SHORT_WORDS = 126: 3x3 up to 896 channels): the per-output epilogue, not the popcounts, dominates.
// |dot| <= 64 * 126 < 8192 fits 16 bits (and so does twice a count), so the
// 8 channels x 4 pixels of a block travel as two vectors of 16-bit lanes
// (lane 16 * (4 * pixel + channel % 4), channels 0-3 in `lo`, 4-7 in `hi`):
// thresholds are 2 compares per vector and one movemask, float outputs 8
// consecutive channels per pixel (mul then add, as the scalar path).
constexpr int64_t SHORT_WORDS = 62;
constexpr int64_t AVX2_SHORT_WORDS = 126;

BNN_AVX2 inline __m256i spread16_avx2(__m256i v) {  // 4 x u64 (< 2^16) -> each repeated in its 4 x 16-bit lanes
  v = _mm256_or_si256(v, _mm256_slli_epi64(v, 16));
  return _mm256_or_si256(v, _mm256_slli_epi64(v, 32));
}

BNN_AVX2 inline __m256i join4_avx2(const __m256i* b) {  // byte counters of 4 channels -> their 16-bit sums
  const __m256i zero = _mm256_setzero_si256();
  return _mm256_or_si256(
      _mm256_or_si256(_mm256_sad_epu8(b[0], zero), _mm256_slli_epi64(_mm256_sad_epu8(b[1], zero), 16)),
      _mm256_or_si256(_mm256_slli_epi64(_mm256_sad_epu8(b[2], zero), 32),
                      _mm256_slli_epi64(_mm256_sad_epu8(b[3], zero), 48)));
}

// A threshold as int16 for a short dot product: |dot| <= 64 * AVX2_SHORT_WORDS < 8192, so clamping to +-8192
// keeps every comparison.
inline int16_t short_threshold(int32_t t) { return static_cast<int16_t>(std::min(std::max(t, -8192), 8192)); }

// Per weight block, for finish_bits_short_avx512: the thresholds a and b of its 8 channels (short_threshold;
// lanes past the group's channels never fire) and its flip bits.
void block_thresholds(const Geo& g, const int32_t* thr, std::vector<int16_t>& ab, std::vector<uint8_t>& flips) {
  ab.assign(g.G * g.OBg * 2 * NB, 0);
  flips.assign(g.G * g.OBg, 0);
  for (int64_t blk = 0; blk < g.G * g.OBg; ++blk) {
    const int64_t gi = blk / g.OBg, ob = blk % g.OBg;
    for (int o = 0; o < NB; ++o) {
      int16_t a = -8192, b = 8192;
      if (ob * NB + o < g.Og) {
        const int32_t* t = thr + 3 * (gi * g.Og + ob * NB + o);
        a = short_threshold(t[0]);
        b = short_threshold(t[1]);
        flips[blk] |= static_cast<uint8_t>((t[2] != 0) << o);
      }
      ab[blk * 2 * NB + o] = a;
      ab[blk * 2 * NB + NB + o] = b;
    }
  }
}

// Per block of 8 channels, 6 rows of 16 x int16: thresholds a and b, then the flip
// mask, each for channels 0-3 then 4-7, repeated for the 4 pixels (short_threshold clamps them).
std::vector<int16_t> short_thresholds(const Geo& g, const int32_t* thr) {
  std::vector<int16_t> tv(g.G * g.OBg * 6 * 16, 0);
  for (int64_t gi = 0; gi < g.G; ++gi)
    for (int64_t ob = 0; ob < g.OBg; ++ob)
      for (int o = 0; o < NB && ob * NB + o < g.Og; ++o) {
        const int32_t* t = thr + 3 * (gi * g.Og + ob * NB + o);
        for (int l = 0; l < 4; ++l) {
          int16_t* row = tv.data() + ((gi * g.OBg + ob) * 6 + (o < 4 ? 0 : 1)) * 16 + 4 * l + o % 4;
          row[0] = short_threshold(t[0]);
          row[2 * 16] = short_threshold(t[1]);
          row[4 * 16] = static_cast<int16_t>(t[2] ? -1 : 0);
        }
      }
  return tv;
}

// For conv_avx2_short: each weight word's low and high nibbles (w & 0x0f.., (w >> 4) & 0x0f..), [G, OBg, kk, 2,
// NB]; per group and word the OR of its weights over all output channels (for the dense test); and per weight
// block and word the popcounts of its channels 0-3 and 4-7 as the 16-bit quarters of two words, [G, OBg, kk, 2]
// (what the dense count adds for an input word that is all zero: see conv_avx2_short).
void nibble_weights(const Geo& g, const int64_t* wts, int64_t kk, std::vector<int64_t>& wnib,
                    std::vector<int64_t>& wor, std::vector<int64_t>& wpop) {
  constexpr uint64_t LOW = 0x0F0F0F0F0F0F0F0FULL;
  wnib.resize(g.G * g.OBg * kk * 2 * NB);
  wor.assign(g.G * kk, 0);
  wpop.assign(g.G * g.OBg * kk * 2, 0);
  const uint64_t* src = reinterpret_cast<const uint64_t*>(wts);
  uint64_t* dst = reinterpret_cast<uint64_t*>(wnib.data());
  uint64_t* pop = reinterpret_cast<uint64_t*>(wpop.data());
  for (int64_t gi = 0; gi < g.G; ++gi) {
    uint64_t* any = reinterpret_cast<uint64_t*>(wor.data()) + gi * kk;
    for (int64_t ob = 0; ob < g.OBg; ++ob)
      for (int64_t i = 0; i < kk; ++i, src += NB, dst += 2 * NB, pop += 2) {
        uint64_t all = 0;
        for (int o = 0; o < NB; ++o) {
          dst[o] = src[o] & LOW;
          dst[NB + o] = (src[o] >> 4) & LOW;
          all |= src[o];
          pop[o / 4] |= static_cast<uint64_t>(__builtin_popcountll(src[o])) << (16 * (o % 4));
        }
        any[i] |= all;
      }
  }
}

// The nibbles of (s ^ w) & z, for the lookup: s ^ (w & z), since a sign bit is only set where its nonzero bit is
// (every packer and threshold writes them so); the nibble split commutes with ^ and &, so s's and z's halves are
// split once per word for all channels and w's once per layer (ConvArgs::wnib, kept by its PackedConvCall). Where
// no weight bit of the group meets a zero input of the 4 pixels (dense: no padding, no zero activation under a
// weight bit), & z changes nothing and is left out: 6 vector ops per channel and word instead of 9 (xor, and,
// 3 to split, 2 lookups, 2 adds).
struct NibbleWord {
  __m256i s_lo, s_hi, z_lo, z_hi;
};

// Byte counters of popcount((s ^ w) & z) for channels C0..C0 + 3 of a weight block over words i0..i1 (at most 31:
// a byte holds 8 per word). Word i's weights are at wn + i * 2 * NB, or (INDEXED: the block kept only some words)
// at wn + widx[i].
template <bool DENSE, bool INDEXED, int C0>
BNN_AVX2 BNN_INLINE void xnor_nibble_bytes_avx2(const NibbleWord* words, const int32_t* widx, int64_t i0, int64_t i1,
                                                const int64_t* wn, __m256i* bytes) {
  const __m256i lut = nibble_popcounts_avx2();
  for (int o = 0; o < 4; ++o) bytes[o] = _mm256_setzero_si256();
  for (int64_t i = i0; i < i1; ++i) {
    const NibbleWord& x = words[i];
    const int64_t* wi = INDEXED ? wn + widx[i] : wn + i * 2 * NB;
    for (int o = 0; o < 4; ++o) {
      __m256i w_lo = _mm256_set1_epi64x(wi[C0 + o]), w_hi = _mm256_set1_epi64x(wi[NB + C0 + o]);
      if (!DENSE) {
        w_lo = _mm256_and_si256(w_lo, x.z_lo);
        w_hi = _mm256_and_si256(w_hi, x.z_hi);
      }
      bytes[o] = _mm256_add_epi8(bytes[o], _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_xor_si256(x.s_lo, w_lo)),
                                                           _mm256_shuffle_epi8(lut, _mm256_xor_si256(x.s_hi, w_hi))));
    }
  }
}

// 16-bit counts of popcount((s ^ w) & z) of a block's channels 0-3 (lo) and 4-7 (hi) over the m words kept
template <bool DENSE, bool INDEXED>
BNN_AVX2 BNN_INLINE void xnor_counts_avx2(const NibbleWord* words, const int32_t* widx, int64_t m, const int64_t* wn,
                                          __m256i& clo, __m256i& chi) {
  clo = chi = _mm256_setzero_si256();
  // byte counters hold at most 8 per word: fold them every 31 words; four channels at a time (eight byte
  // counters with s's and z's halves and the lookup table are more than the 16 registers)
  for (int64_t i0 = 0; i0 < m; i0 += 31) {
    const int64_t i1 = std::min<int64_t>(m, i0 + 31);
    __m256i bytes[4];
    xnor_nibble_bytes_avx2<DENSE, INDEXED, 0>(words, widx, i0, i1, wn, bytes);
    clo = _mm256_add_epi16(clo, join4_avx2(bytes));
    xnor_nibble_bytes_avx2<DENSE, INDEXED, 4>(words, widx, i0, i1, wn, bytes);
    chi = _mm256_add_epi16(chi, join4_avx2(bytes));
  }
}

// Pixel blocks of conv_avx2_short: 4 consecutive output pixels in row-major order, so a row narrower than 4 pixels,
// or one whose width is not a multiple of 4, still fills every lane (a 2x2 output is one block, not two half-empty
// ones); a block that crosses rows gathers its 4 lanes' words one by one.
inline int64_t avx2_short_blocks(const Geo& g) { return ceil_div(g.OH * g.OW, 4); }

// Walks blocks vb, vb + 1, ... of an image's packed input (img: the group's first word): each block's first pixel
// (oh0, ow0) is stepped along rather than divided per block (a division costs as much as a 1x1 conv's block of
// popcounts); words(o) loads the block's 4 lanes of the word at offset o (sign plane, and nonzero plane `plane`
// words on), in one load where the block lies in one row, else gathered (lanes past nl repeat the last pixel).
struct PixelBlock4 {
  const int64_t* img;
  int64_t OW, npix, row_step, plane;
  int64_t oh0, ow0, pix0 = 0;
  int nl = 0;
  bool one_row = true;
  const int64_t* base = nullptr;
  const int64_t* lane[4] = {};

  PixelBlock4(const int64_t* img_, const Geo& g, int64_t vb)
      : img(img_), OW(g.OW), npix(g.OH * g.OW), row_step(g.SH * g.row_stride), plane(g.plane),
        oh0((4 * vb) / g.OW), ow0((4 * vb) % g.OW - 4) {}

  void next() {  // to the next block (the first call: to block vb)
    for (ow0 += 4; ow0 >= OW; ow0 -= OW) ++oh0;
    pix0 = oh0 * OW + ow0;
    nl = static_cast<int>(std::min<int64_t>(4, npix - pix0));
    one_row = ow0 + nl <= OW;
    base = img + oh0 * row_step + ow0;
    if (one_row) return;
    int64_t oh = oh0, ow = ow0;
    for (int l = 0; l < 4; ++l) {
      lane[l] = img + oh * row_step + ow;
      if (l + 1 < nl && ++ow == OW) {
        ow = 0;
        ++oh;
      }
    }
  }

  BNN_AVX2 BNN_INLINE void words(int64_t o, __m256i& sv, __m256i& zv) const {
    if (one_row) {
      sv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + o));
      zv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + o + plane));
    } else {
      sv = _mm256_set_epi64x(lane[3][o], lane[2][o], lane[1][o], lane[0][o]);
      zv = _mm256_set_epi64x(lane[3][o + plane], lane[2][o + plane], lane[1][o + plane], lane[0][o + plane]);
    }
  }
};

BNN_AVX2 void conv_avx2_short(const ConvArgs& a, int64_t n, int64_t gi, int64_t vb, int64_t ve) {
  const Geo& g = *a.g;
  // what the loops read, in locals: the output bytes are stored through uint8_t*, which may alias anything, so
  // the compiler would load each field of `a` and `g` again after every store
  const int64_t OBg = g.OBg, Og = g.Og, kk = a.kk;
  const int64_t npix = g.OH * g.OW, pixel_bytes = a.NWo * 16;
  const int64_t* img = a.act + n * g.img_stride + gi * g.NWg * g.word_stride;
  const int64_t* offs = a.offs;
  const int64_t* wnib = a.wnib + gi * OBg * kk * 2 * NB;
  const int64_t* wor = a.wor + gi * kk;
  const int64_t* wpop = a.wpop + gi * OBg * kk * 2;
  const int16_t* thr16 = a.thr16 == nullptr ? nullptr : a.thr16 + gi * OBg * 6 * 16;
  uint8_t* bits = reinterpret_cast<uint8_t*>(a.bits);
  const int64_t pix_base = n * npix;
  const __m256i zero = _mm256_setzero_si256(), low = _mm256_set1_epi8(0x0f);
  const __m256i lut = nibble_popcounts_avx2();
  NibbleWord words[AVX2_SHORT_WORDS];
  int32_t widx[AVX2_SHORT_WORDS];  // the kept words' weight offsets (in words of wnib's block)
  __m256i empty_lanes[AVX2_SHORT_WORDS];  // per kept word with some all-zero lanes: those lanes (64-bit masks)
  int32_t empty_word[AVX2_SHORT_WORDS];   // and the word's index
  PixelBlock4 block(img, g, vb);
  for (int64_t v = vb; v < ve; ++v) {
    block.next();
    const int64_t pix0 = block.pix0;
    const int nl = block.nl;
    // The block's input words, split into nibbles. A word that is zero in every lane's nonzero plane (a padding
    // tap of all 4 pixels: a small image's border, a 1x1 output of a 3x3 conv) contributes nothing and is left
    // out, so it costs no popcounts. One that is zero in some lanes only (a padding tap of the block's pixels at
    // the image's edge) does not make the block sparse either: its sign bits are zero there too, so the dense
    // count, popcount(s ^ w) without the & z, counts exactly popcount(w) too many in those lanes, which is
    // taken off afterwards from the layer's per-word popcounts (wpop).
    __m256i stray = zero;  // weight bits over zero inputs of lanes not all zero, any channel: 0 where dense
    __m256i vbytes = zero, valid = zero;  // the lanes' nonzero input bits: byte counters, folded every 31 words
    int64_t m = 0, ne = 0;
    for (int64_t i = 0; i < kk; ++i) {
      __m256i sv, zv;
      block.words(offs[i], sv, zv);
      if (_mm256_testz_si256(zv, zv)) continue;
      const __m256i z_lo = _mm256_and_si256(zv, low), z_hi = _mm256_and_si256(_mm256_srli_epi16(zv, 4), low);
      words[m] = {_mm256_and_si256(sv, low), _mm256_and_si256(_mm256_srli_epi16(sv, 4), low), z_lo, z_hi};
      widx[m] = static_cast<int32_t>(i * 2 * NB);
      const __m256i empty = _mm256_cmpeq_epi64(zv, zero);
      if (!_mm256_testz_si256(empty, empty)) {
        empty_lanes[ne] = empty;
        empty_word[ne++] = static_cast<int32_t>(i);
      }
      stray = _mm256_or_si256(stray, _mm256_andnot_si256(empty, _mm256_andnot_si256(zv, _mm256_set1_epi64x(wor[i]))));
      vbytes = _mm256_add_epi8(vbytes, _mm256_add_epi8(_mm256_shuffle_epi8(lut, z_lo), _mm256_shuffle_epi8(lut, z_hi)));
      if (++m % 31 == 0) {
        valid = _mm256_add_epi64(valid, _mm256_sad_epu8(vbytes, zero));
        vbytes = zero;
      }
    }
    valid = _mm256_add_epi64(valid, _mm256_sad_epu8(vbytes, zero));
    const bool dense = _mm256_testz_si256(stray, stray) != 0, all_words = m == kk;
    const __m256i valid16 = spread16_avx2(valid);
    for (int64_t ob = 0; ob < OBg; ++ob) {
      const int64_t* wn = wnib + ob * kk * 2 * NB;
      __m256i clo, chi;  // 16-bit counts, channels 0-3 and 4-7
      if (all_words) {
        if (dense) {
          xnor_counts_avx2<true, false>(words, widx, m, wn, clo, chi);
        } else {
          xnor_counts_avx2<false, false>(words, widx, m, wn, clo, chi);
        }
      } else if (dense) {
        xnor_counts_avx2<true, true>(words, widx, m, wn, clo, chi);
      } else {
        xnor_counts_avx2<false, true>(words, widx, m, wn, clo, chi);
      }
      if (dense && ne > 0) {  // the all-zero lanes' popcount(w), counted by the dense count
        const int64_t* wp = wpop + ob * kk * 2;
        for (int64_t j = 0; j < ne; ++j) {
          const int64_t* pj = wp + 2 * empty_word[j];
          clo = _mm256_sub_epi16(clo, _mm256_and_si256(_mm256_set1_epi64x(pj[0]), empty_lanes[j]));
          chi = _mm256_sub_epi16(chi, _mm256_and_si256(_mm256_set1_epi64x(pj[1]), empty_lanes[j]));
        }
      }
      const __m256i dlo = _mm256_sub_epi16(valid16, _mm256_slli_epi16(clo, 1));
      const __m256i dhi = _mm256_sub_epi16(valid16, _mm256_slli_epi16(chi, 1));
      const int nvalid = static_cast<int>(std::min<int64_t>(NB, Og - ob * NB));
      const int64_t oc0 = gi * Og + ob * NB;
      if (thr16 != nullptr && oc0 % 8 == 0) {
        const __m256i* tb = reinterpret_cast<const __m256i*>(thr16 + ob * 6 * 16);
        const __m256i lo_l = _mm256_cmpgt_epi16(_mm256_loadu_si256(tb + 0), dlo);  // dot < a
        const __m256i lo_h = _mm256_cmpgt_epi16(_mm256_loadu_si256(tb + 1), dhi);
        const __m256i ones = _mm256_set1_epi16(-1);
        const __m256i hi_l = _mm256_xor_si256(_mm256_cmpgt_epi16(_mm256_loadu_si256(tb + 2), dlo), ones);
        const __m256i hi_h = _mm256_xor_si256(_mm256_cmpgt_epi16(_mm256_loadu_si256(tb + 3), dhi), ones);
        const __m256i s_l = _mm256_blendv_epi8(hi_l, lo_l, _mm256_loadu_si256(tb + 4));  // flip: sign = lo
        const __m256i s_h = _mm256_blendv_epi8(hi_h, lo_h, _mm256_loadu_si256(tb + 5));
        const __m256i z_l = _mm256_or_si256(lo_l, hi_l), z_h = _mm256_or_si256(lo_h, hi_h);
        // lanes 16 * (4 * pixel + channel % 4), channels 0-3 in _l, 4-7 in _h: a pixel's 4 + 4 lanes side by
        // side (unpack), then to bytes (packs, per 128-bit lane: pixels 0, 1 then 2, 3), so that byte l of the
        // mask holds pixel l's 8 channels
        const uint32_t ms = static_cast<uint32_t>(_mm256_movemask_epi8(
            _mm256_packs_epi16(_mm256_unpacklo_epi64(s_l, s_h), _mm256_unpackhi_epi64(s_l, s_h))));
        const uint32_t mz = static_cast<uint32_t>(_mm256_movemask_epi8(
            _mm256_packs_epi16(_mm256_unpacklo_epi64(z_l, z_h), _mm256_unpackhi_epi64(z_l, z_h))));
        const uint32_t keep = (1u << nvalid) - 1u;
        uint8_t* out = bits + (pix_base + pix0) * pixel_bytes + (oc0 / 64) * 16 + (oc0 % 64) / 8;
        for (int l = 0; l < nl; ++l, out += pixel_bytes) {
          out[0] = static_cast<uint8_t>((ms >> (8 * l)) & keep);
          out[8] = static_cast<uint8_t>((mz >> (8 * l)) & keep);
        }
        continue;
      }
      if (a.thr == nullptr && a.counts == nullptr && a.nhwc && nvalid == NB) {
        // pixels 0 and 2 / 1 and 3: channels 0-7 as 8 x int16 per 128-bit lane
        const __m256i p02 = _mm256_unpacklo_epi64(dlo, dhi), p13 = _mm256_unpackhi_epi64(dlo, dhi);
        const __m128i px[4] = {_mm256_castsi256_si128(p02), _mm256_castsi256_si128(p13),
                               _mm256_extracti128_si256(p02, 1), _mm256_extracti128_si256(p13, 1)};
        for (int l = 0; l < nl; ++l) {
          __m256 y = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(px[l]));
          if (a.alpha != nullptr) y = _mm256_mul_ps(y, _mm256_loadu_ps(a.alpha + oc0));
          if (a.bias != nullptr) y = _mm256_add_ps(y, _mm256_loadu_ps(a.bias + oc0));
          _mm256_storeu_ps(a.out + (n * g.OH * g.OW + pix0 + l) * g.O + oc0, y);
        }
        continue;
      }
      alignas(32) int16_t d16[2][16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(d16[0]), dlo);
      _mm256_store_si256(reinterpret_cast<__m256i*>(d16[1]), dhi);
      for (int l = 0; l < nl; ++l) {
        int64_t dots[NB];
        for (int o = 0; o < NB; ++o) dots[o] = d16[o / 4][4 * l + o % 4];
        finish_block(a, n, oc0, nvalid, pix0 + l, dots);
      }
    }
  }
}

// ---- AVX2, nibble tables with output channels in the lanes (outputs as bits or channels-last values). The
// count popcount((s ^ w) & z) over 4 input channels (a nibble of s, w and z) depends on w only through its
// nibble, so for the pixel's (s, z) nibble pair a 16-byte table holds it for all 16 weight nibbles; vpshufb with
// 32 output channels' weight nibbles as the index gives those 32 counts in one instruction, added into byte
// counters that are already per output channel: no xor, no horizontal sums, and the thresholds' compare masks
// come out in channel order, a packed output word's bit order (the table lookups of T-MAC, Wei et al., EuroSys
// 2025, with the roles of activations and weights swapped). Per input nibble and 32 output channels: one
// shuffle and one add (and a share of the table's broadcast); conv_avx2_short spends as many shuffles on the
// same bits, with an xor more for each, then byte sums per pixel and a shuffle of the compares into bytes.
// The 256 tables (one per (s, z) nibble pair, index s | z << 4): popcount((s ^ w) & z) for w = 0..15.
const uint8_t* nibble_pair_tables() {
  static const std::array<uint8_t, 256 * 16> tables = [] {
    std::array<uint8_t, 256 * 16> t{};
    for (int idx = 0; idx < 256; ++idx)
      for (int w = 0; w < 16; ++w) t[idx * 16 + w] = static_cast<uint8_t>(__builtin_popcount(((idx & 15) ^ w) & (idx >> 4)));
    return t;
  }();
  return tables.data();
}

// What conv_avx2_lut reads besides the input, made once per layer: per group and output word (64 channels) the
// weight nibbles of every live input nibble (one holding at least one real input channel, not only the padding
// of a group's last word), 64 bytes each; per live nibble its place in the block's table-index buffer; per output
// word the thresholds as 16-bit lanes in the order that unpacking bytes to 16 bits leaves them in (channels
// 0-7 and 16-23 of each 32, then 8-15 and 24-31: packing back to bytes restores the order), a and b - 1, and the
// flips as bytes in channel order. Channels past the group's never fire (a = -8192, b - 1 = 8192).
struct LutWeights {
  int64_t npos = 0, words_out = 0;  // live nibbles, output words per group
  std::vector<uint8_t> nibbles;     // [G, words_out, npos, 64]
  std::vector<int32_t> pos;         // [npos]: 16-bit entries into the index buffer, (i * 2 + h) * 32 + b
  std::vector<int16_t> thr;         // [G, words_out, 2 chunks, 4 (a lo, a hi, b-1 lo, b-1 hi), 16]
  std::vector<uint8_t> flips;       // [G, words_out, 64]: 0xff where the sign is the lo side
};

LutWeights lut_weights(const Geo& g, const int64_t* wts, int64_t kk, const int32_t* thr) {
  LutWeights lw;
  lw.words_out = ceil_div(g.Og, 64);
  for (int64_t i = 0; i < kk; ++i) {  // word i is packed word i % NWg of its tap (conv_impl's offs order)
    const int64_t first = 64 * (i % g.NWg);
    for (int64_t q = 0; q < 16; ++q)
      if (first + 4 * q < g.Cg) lw.pos.push_back(static_cast<int32_t>((i * 2 + (q & 1)) * 32 + (q >> 1)));
  }
  lw.npos = static_cast<int64_t>(lw.pos.size());
  lw.nibbles.assign(g.G * lw.words_out * lw.npos * 64, 0);
  lw.thr.assign(g.G * lw.words_out * 2 * 4 * 16, 0);
  lw.flips.assign(g.G * lw.words_out * 64, 0);
  for (int64_t gi = 0; gi < g.G; ++gi)
    for (int64_t wo = 0; wo < lw.words_out; ++wo) {
      const int64_t blk = gi * lw.words_out + wo;
      uint8_t* nib = lw.nibbles.data() + blk * lw.npos * 64;
      for (int64_t i = 0, t = 0; i < kk; ++i) {
        const int64_t first = 64 * (i % g.NWg);
        for (int64_t q = 0; q < 16; ++q) {
          if (first + 4 * q >= g.Cg) continue;
          for (int64_t c = 0; c < 64; ++c) {
            const int64_t o = wo * 64 + c;
            if (o >= g.Og) break;
            const uint64_t w = static_cast<uint64_t>(wts[((gi * g.OBg + o / NB) * kk + i) * NB + o % NB]);
            nib[t * 64 + c] = static_cast<uint8_t>((w >> (4 * q)) & 15);
          }
          ++t;
        }
      }
      int16_t* tv = lw.thr.data() + blk * 2 * 4 * 16;
      for (int64_t c = 0; c < 64 && thr != nullptr; ++c) {
        const int64_t o = wo * 64 + c, chunk = c / 32, k = c % 32;
        // lane of channel k in the unpacked vectors: lo holds k = 0-7, 16-23; hi k = 8-15, 24-31
        const int64_t half = (k / 8) % 2, lane = (k / 16) * 8 + k % 8;
        int16_t a = -8192, bm = 8192;
        if (o < g.Og) {
          const int32_t* t = thr + 3 * (gi * g.Og + o);
          a = short_threshold(t[0]);
          bm = static_cast<int16_t>(short_threshold(t[1]) - 1);
          if (t[2]) lw.flips[blk * 64 + c] = 0xff;
        }
        tv[(chunk * 4 + half) * 16 + lane] = a;
        tv[(chunk * 4 + 2 + half) * 16 + lane] = bm;
      }
    }
  return lw;
}

// A pixel's 16-bit dot products V - 2 P of chunk c (32 output channels) from its byte counters (bytes) and, after
// folds, the 16-bit sums so far (wide, or null): channels 0-7 and 16-23 of the chunk in `lo`, 8-15 and 24-31 in
// `hi` (the order unpacking bytes leaves them in).
BNN_AVX2 BNN_INLINE void lut_dots(const __m256i* bytes, const __m256i* wide, __m256i v16, int c, __m256i& lo,
                                  __m256i& hi) {
  const __m256i zero = _mm256_setzero_si256();
  __m256i plo = _mm256_unpacklo_epi8(bytes[c], zero), phi = _mm256_unpackhi_epi8(bytes[c], zero);
  if (wide != nullptr) {
    plo = _mm256_add_epi16(plo, wide[2 * c]);
    phi = _mm256_add_epi16(phi, wide[2 * c + 1]);
  }
  lo = _mm256_sub_epi16(v16, _mm256_add_epi16(plo, plo));
  hi = _mm256_sub_epi16(v16, _mm256_add_epi16(phi, phi));
}

// conv_avx2_lut's output of one word of 64 channels at pixel p of a block: packed bits by the thresholds (tv and
// flips as in LutWeights) ...
struct LutBitsOut {
  const int16_t* tv;
  const uint8_t* flips;
  int64_t* out;  // the word of the block's first pixel
  int64_t pixel_words;

  template <int NC>
  BNN_AVX2 BNN_INLINE void finish(int p, const __m256i* bytes, const __m256i* wide, int64_t valid) const {
    const __m256i v16 = _mm256_set1_epi16(static_cast<int16_t>(valid));
    uint64_t ms = 0, mz = 0;
    BNN_UNROLL
    for (int c = 0; c < NC; ++c) {
      __m256i dlo, dhi;
      lut_dots(bytes, wide, v16, c, dlo, dhi);
      const __m256i* t = reinterpret_cast<const __m256i*>(tv + c * 4 * 16);
      const __m256i below = _mm256_packs_epi16(_mm256_cmpgt_epi16(_mm256_loadu_si256(t + 0), dlo),  // dot < a
                                               _mm256_cmpgt_epi16(_mm256_loadu_si256(t + 1), dhi));
      const __m256i above = _mm256_packs_epi16(_mm256_cmpgt_epi16(dlo, _mm256_loadu_si256(t + 2)),  // dot >= b
                                               _mm256_cmpgt_epi16(dhi, _mm256_loadu_si256(t + 3)));
      const __m256i f = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(flips + 32 * c));
      ms |= static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_blendv_epi8(above, below, f))))
            << (32 * c);
      mz |= static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_or_si256(below, above))))
            << (32 * c);
    }
    int64_t* word = out + p * pixel_words;
    word[0] = static_cast<int64_t>(ms);
    word[1] = static_cast<int64_t>(mz);
  }
};

// ... or channels-last values: float(dot) * alpha + bias (mul then add, as finish_one) or the int32 counts, for
// the word's nvalid channels from oc0.
struct LutValuesOut {
  const float* alpha;  // from channel oc0, or null
  const float* bias;   // from channel oc0, or null
  float* out;          // the block's first pixel at channel oc0, or null
  int32_t* counts;     // the same for counts, or null
  int64_t pixel_stride;
  int nvalid;

  template <int NC>
  BNN_AVX2 BNN_INLINE void finish(int p, const __m256i* bytes, const __m256i* wide, int64_t valid) const {
    const __m256i v16 = _mm256_set1_epi16(static_cast<int16_t>(valid));
    BNN_UNROLL
    for (int c = 0; c < NC; ++c) {
      __m256i dlo, dhi;
      lut_dots(bytes, wide, v16, c, dlo, dhi);
      const __m128i part[4] = {_mm256_castsi256_si128(dlo), _mm256_castsi256_si128(dhi),
                               _mm256_extracti128_si256(dlo, 1), _mm256_extracti128_si256(dhi, 1)};
      BNN_UNROLL
      for (int q = 0; q < 4; ++q) {  // channels 32 c + 8 q .. + 7
        const int ch = 32 * c + 8 * q;
        if (ch >= nvalid) break;
        const __m256i dots = _mm256_cvtepi16_epi32(part[q]);
        const int64_t at = p * pixel_stride + ch;
        if (ch + 8 <= nvalid) {  // plain loads and stores (masked stores are slow on AMD cores)
          if (counts != nullptr) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(counts + at), dots);
            continue;
          }
          __m256 y = _mm256_cvtepi32_ps(dots);
          if (alpha != nullptr) y = _mm256_mul_ps(y, _mm256_loadu_ps(alpha + ch));
          if (bias != nullptr) y = _mm256_add_ps(y, _mm256_loadu_ps(bias + ch));
          _mm256_storeu_ps(out + at, y);
          continue;
        }
        const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(nvalid - ch),
                                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        if (counts != nullptr) {
          _mm256_maskstore_epi32(counts + at, lanes, dots);
          continue;
        }
        __m256 y = _mm256_cvtepi32_ps(dots);
        if (alpha != nullptr) y = _mm256_mul_ps(y, _mm256_maskload_ps(alpha + ch, lanes));
        if (bias != nullptr) y = _mm256_add_ps(y, _mm256_maskload_ps(bias + ch, lanes));
        _mm256_maskstore_ps(out + at, lanes, y);
      }
    }
  }
};

// NC chunks of 32 output channels of a block of 4 pixels: idx holds each pixel's table offsets (in bytes,
// (s | z << 4) * 16) in the layout of LutWeights::pos, 8 per pixel; chunks 0 and 1 are an output word's (weight
// nibbles nib0, finished by out0), chunk 2 the next word's (nib1, out1).
template <int NC, typename Out>
BNN_AVX2 BNN_INLINE void lut_chunks_avx2(const uint8_t* tables, const uint16_t* idx, const int32_t* pos, int64_t npos,
                                         const uint8_t* nib0, const uint8_t* nib1, const int64_t* valid, int nl,
                                         const Out& out0, const Out& out1) {
  const __m256i zero = _mm256_setzero_si256();
  __m256i acc[4][NC];
  alignas(32) __m256i wide[4][2 * NC];
  bool folded = false;
  for (int64_t t0 = 0; t0 < npos; t0 += 63) {  // a byte counter takes at most 4 per nibble: fold every 63
    const int64_t t1 = std::min<int64_t>(npos, t0 + 63);
    BNN_UNROLL
    for (int p = 0; p < 4; ++p)
      BNN_UNROLL
      for (int c = 0; c < NC; ++c) acc[p][c] = zero;
    for (int64_t t = t0; t < t1; ++t) {
      __m256i w[NC];
      BNN_UNROLL
      for (int c = 0; c < NC; ++c)
        w[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>((c < 2 ? nib0 + 32 * c : nib1) + t * 64));
      const uint16_t* at = idx + pos[t];
      BNN_UNROLL
      for (int p = 0; p < 4; ++p) {
        const __m256i tab = _mm256_broadcastsi128_si256(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(tables + at[8 * p])));
        BNN_UNROLL
        for (int c = 0; c < NC; ++c) acc[p][c] = _mm256_add_epi8(acc[p][c], _mm256_shuffle_epi8(tab, w[c]));
      }
    }
    if (t1 < npos || folded) {
      BNN_UNROLL
      for (int p = 0; p < 4; ++p)
        BNN_UNROLL
        for (int c = 0; c < NC; ++c) {
          const __m256i lo = _mm256_unpacklo_epi8(acc[p][c], zero), hi = _mm256_unpackhi_epi8(acc[p][c], zero);
          wide[p][2 * c] = folded ? _mm256_add_epi16(wide[p][2 * c], lo) : lo;
          wide[p][2 * c + 1] = folded ? _mm256_add_epi16(wide[p][2 * c + 1], hi) : hi;
          acc[p][c] = zero;
        }
      folded = true;
    }
  }
  BNN_UNROLL
  for (int p = 0; p < 4; ++p) {
    if (p >= nl) break;
    out0.template finish<(NC < 2 ? NC : 2)>(p, acc[p], folded ? wide[p] : nullptr, valid[p]);
    if constexpr (NC > 2) out1.template finish<NC - 2>(p, acc[p] + 2, folded ? wide[p] + 4 : nullptr, valid[p]);
  }
}

// One pass over the block's tables for the output channels from word wo on (`left` of them): one word (1 or 2
// chunks of 32), or the last two words where they hold at most 96 channels (3 chunks: each pixel's tables are
// broadcast once for all three, where two passes, 2 + 1 chunks, broadcast them twice). make(w) gives word w's
// output. Returns the words done.
template <typename MakeOut>
BNN_AVX2 BNN_INLINE int64_t lut_pass(const uint8_t* tables, const uint16_t* idx, const LutWeights& lw, int64_t gi,
                                     int64_t wo, int64_t left, const int64_t* valid, int nl, const MakeOut& make) {
  const uint8_t* nib = lw.nibbles.data() + (gi * lw.words_out + wo) * lw.npos * 64;
  const int32_t* pos = lw.pos.data();
  if (left > 64 && left <= 96) {
    lut_chunks_avx2<3>(tables, idx, pos, lw.npos, nib, nib + lw.npos * 64, valid, nl, make(wo), make(wo + 1));
    return 2;
  }
  if (left > 32) {
    lut_chunks_avx2<2>(tables, idx, pos, lw.npos, nib, nib, valid, nl, make(wo), make(wo));
  } else {
    lut_chunks_avx2<1>(tables, idx, pos, lw.npos, nib, nib, valid, nl, make(wo), make(wo));
  }
  return 1;
}

BNN_AVX2 void conv_avx2_lut(const ConvArgs& a, const LutWeights& lw, int64_t n, int64_t gi, int64_t vb,
                            int64_t ve) {
  const Geo& g = *a.g;
  const int64_t kk = a.kk, npix = g.OH * g.OW;
  const int64_t* img = a.act + n * g.img_stride + gi * g.NWg * g.word_stride;
  const int64_t* offs = a.offs;
  const int64_t pixel_words = a.NWo * 2;
  const __m256i low = _mm256_set1_epi8(0x0f), high = _mm256_set1_epi8(static_cast<char>(0xf0));
  const uint8_t* tables = nibble_pair_tables();
  uint16_t idx[AVX2_SHORT_WORDS * 2 * 4 * 8];  // per word: 2 halves x 4 pixels x 8 bytes (uses_avx2_lut: kk fits)
  PixelBlock4 block(img, g, vb);
  for (int64_t v = vb; v < ve; ++v) {
    block.next();
    // each word's table offsets: even nibbles (s & 15) | (z & 15) << 4, odd ones (s >> 4 & 15) | (z & 0xf0), per
    // byte of the word, times 16 as 16-bit numbers; and the pixels' counts of nonzero inputs
    __m256i vbytes = _mm256_setzero_si256(), valid = _mm256_setzero_si256();
    for (int64_t i = 0; i < kk; ++i) {
      __m256i sv, zv;
      block.words(offs[i], sv, zv);
      const __m256i even = _mm256_or_si256(_mm256_and_si256(sv, low), _mm256_slli_epi16(_mm256_and_si256(zv, low), 4));
      const __m256i odd = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(sv, 4), low), _mm256_and_si256(zv, high));
      __m256i* dst = reinterpret_cast<__m256i*>(idx + i * 64);
      _mm256_storeu_si256(dst + 0, _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(even)), 4));
      _mm256_storeu_si256(dst + 1, _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(even, 1)), 4));
      _mm256_storeu_si256(dst + 2, _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(odd)), 4));
      _mm256_storeu_si256(dst + 3, _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(odd, 1)), 4));
      vbytes = _mm256_add_epi8(vbytes, popcnt_bytes_avx2(zv));
      if ((i + 1) % 31 == 0 || i + 1 == kk) {
        valid = _mm256_add_epi64(valid, _mm256_sad_epu8(vbytes, _mm256_setzero_si256()));
        vbytes = _mm256_setzero_si256();
      }
    }
    alignas(32) int64_t vv[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(vv), valid);
    const int64_t pix = n * npix + block.pix0;
    for (int64_t wo = 0; wo < lw.words_out;) {
      const int64_t left = g.Og - 64 * wo;
      if (a.bits != nullptr) {
        wo += lut_pass(tables, idx, lw, gi, wo, left, vv, block.nl, [&](int64_t w) {
          const int64_t blk = gi * lw.words_out + w;
          return LutBitsOut{lw.thr.data() + blk * 2 * 4 * 16, lw.flips.data() + blk * 64,
                            a.bits + pix * pixel_words + (gi * g.Og / 64 + w) * 2, pixel_words};
        });
      } else {
        wo += lut_pass(tables, idx, lw, gi, wo, left, vv, block.nl, [&](int64_t w) {
          const int64_t oc0 = gi * g.Og + 64 * w;
          return LutValuesOut{a.alpha == nullptr ? nullptr : a.alpha + oc0, a.bias == nullptr ? nullptr : a.bias + oc0,
                              a.out == nullptr ? nullptr : a.out + pix * g.O + oc0,
                              a.counts == nullptr ? nullptr : a.counts + pix * g.O + oc0, g.O,
                              static_cast<int>(std::min<int64_t>(64, g.Og - 64 * w))};
        });
      }
    }
  }
}

BNN_AVX2 void conv_avx2(const ConvArgs& a, int64_t n, int64_t gi, int64_t vb, int64_t ve) {
  const Geo& g = *a.g;
  const int64_t vpr = ceil_div(g.OW, 4);
  const int64_t* img = a.act + n * g.img_stride + gi * g.NWg * g.word_stride;
  const __m256i zero = _mm256_setzero_si256();
  const int64_t kk = a.kk;
  const int64_t* offs = a.offs;
  for (int64_t v = vb; v < ve; ++v) {
    const int64_t oh = v / vpr, ow0 = (v % vpr) * 4;
    const int64_t* base = img + oh * g.SH * g.row_stride + ow0;
    const int64_t pix0 = oh * g.OW + ow0;
    const int nl = static_cast<int>(std::min<int64_t>(4, g.OW - ow0));
    const __m256i valid = nonzero_counts_avx2(base, offs, kk, g.plane);
    alignas(32) int64_t vv[4], acc[NB][4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(vv), valid);
    for (int64_t ob = 0; ob < g.OBg; ++ob) {
      const int64_t* wb = a.wts + (gi * g.OBg + ob) * kk * NB;
      for (int o = 0; o < NB; ++o) _mm256_store_si256(reinterpret_cast<__m256i*>(acc[o]), zero);
      // byte counters hold at most 8 per word: fold them every 31 words
      for (int64_t i0 = 0; i0 < kk; i0 += 31) {
        const int64_t i1 = std::min<int64_t>(kk, i0 + 31);
        __m256i bytes[NB];
        xnor_bytes_avx2(base, offs, i0, i1, g.plane, wb, bytes);
        wb += (i1 - i0) * NB;
        for (int o = 0; o < NB; ++o) {
          __m256i* at = reinterpret_cast<__m256i*>(acc[o]);
          _mm256_store_si256(at, _mm256_add_epi64(_mm256_load_si256(at), _mm256_sad_epu8(bytes[o], zero)));
        }
      }
      const int nvalid = static_cast<int>(std::min<int64_t>(NB, g.Og - ob * NB));
      const int64_t oc0 = gi * g.Og + ob * NB;
      if (a.thr != nullptr && oc0 % 8 == 0) {
        // thresholds on 4 pixels at once; channel o's 4 pixel bits go to byte o, then one 8x8 bit transpose
        uint64_t ms = 0, mz = 0;
        for (int o = 0; o < nvalid; ++o) {
          const int32_t* t = a.thr + 3 * (oc0 + o);
          const __m256i dot = _mm256_sub_epi64(valid, _mm256_slli_epi64(
                                                          _mm256_load_si256(reinterpret_cast<const __m256i*>(acc[o])), 1));
          const __m256i lo = _mm256_cmpgt_epi64(_mm256_set1_epi64x(t[0]), dot);             // dot < a
          const __m256i below_b = _mm256_cmpgt_epi64(_mm256_set1_epi64x(t[1]), dot);        // dot < b
          const uint64_t mlo = static_cast<uint64_t>(_mm256_movemask_pd(_mm256_castsi256_pd(lo)));
          const uint64_t mhi = static_cast<uint64_t>(~_mm256_movemask_pd(_mm256_castsi256_pd(below_b)) & 0xf);
          ms |= (t[2] ? mlo : mhi) << (8 * o);
          mz |= (mlo | mhi) << (8 * o);
        }
        ms = transpose_bits8x8(ms);
        mz = transpose_bits8x8(mz);
        for (int l = 0; l < nl; ++l) {
          uint8_t* w = reinterpret_cast<uint8_t*>(a.bits + ((n * g.OH * g.OW + pix0 + l) * a.NWo + oc0 / 64) * 2);
          w[(oc0 % 64) / 8] = static_cast<uint8_t>(ms >> (8 * l));
          w[8 + (oc0 % 64) / 8] = static_cast<uint8_t>(mz >> (8 * l));
        }
        continue;
      }
      for (int l = 0; l < nl; ++l) {
        int64_t dots[NB];
        for (int o = 0; o < NB; ++o) dots[o] = vv[l] - 2 * acc[o][l];
        finish_block(a, n, oc0, nvalid, pix0 + l, dots);
      }
    }
  }
}
#endif  // BNN_X86

// ---------------------------------------------------------------- paired taps
//
// A group of at most 32 input channels fills only the low half of each 64-bit
// word, so a 3x3 conv would popcount 9 half-empty words per output. With a
// kernel at least 2 wide (dilation 1 along W), the packed input gets a second
// image after the first (at + N * img_stride words) whose word at padded
// column iw holds column iw in its low half and column iw + 1 in its high half;
// taps kw and kw + 1 of a row are then one word of that image against one
// weight word holding both taps' bits, and an odd last tap reads the first
// image as before: 9 -> 6 words for a 3x3, 25 -> 15 for a 5x5. The counts are
// the same integers (the same bits are counted), so the outputs are unchanged.
// Where popcounts are the cost (AVX2 and the scalar kernels) that made every
// layer tried 1.0-1.5x faster; with AVX-512 VPOPCNTDQ, whose popcounts are
// cheap, building the second image cost more than it saved on grouped convs on
// small images or at stride 2 (0.86-0.93x on a Zen 5 and a Zen 4 EPYC), while
// ungrouped convs gained there too (1.01-1.21x on Zen 5, 1.02-1.29x on Zen 4,
// whose 512-bit popcounts take two passes): that kernel pairs ungrouped convs
// only (benchmarks/runtime_paired_taps.md, runtime_paired_taps_zen4.md).
// set_pair_taps(mode), for A/B timing and tests: 0 never, 1 where it pays (the default), 2 with every kernel
enum PairMode : int64_t { PAIR_NEVER = 0, PAIR_AUTO = 1, PAIR_ALWAYS = 2 };
std::atomic<int64_t> g_pair_mode{PAIR_AUTO};

bool pairs_taps(const Geo& g, int64_t isa) {
  const int64_t mode = g_pair_mode.load();
  const bool pays = isa != ISA_AVX512 || g.G == 1;  // AVX-512 VPOPCNTDQ: ungrouped convs only (comment above)
  return (mode == PAIR_ALWAYS || (mode == PAIR_AUTO && pays)) && g.Cg <= 32 && g.NWg == 1 && g.KW >= 2 &&
         g.DW == 1;
}

// set_avx2_lut(mode), for A/B timing and tests: 0 never, 1 where it pays (the default), 2 wherever it can run.
// conv_avx2_lut writes whole output words of thresholded bits or channels-last values (a group's channels must
// start on a word) for dot products that fit its 16-bit compares (kk <= AVX2_SHORT_WORDS); it reads one tap per
// word, so a layer it runs is not paired.
enum LutMode : int64_t { LUT_NEVER = 0, LUT_AUTO = 1, LUT_ALWAYS = 2 };
std::atomic<int64_t> g_lut_mode{LUT_AUTO};

// Where it pays: 1.15-1.6x the pixel-lane kernel on 1x1, 3x3 and 5x5 convs of 32 to 256 outputs, 2.9x over 8
// input channels (benchmarks/runtime_avx2_kernels.md, Zen 4); with 16 outputs or fewer half of each 32-channel
// lookup is idle and it was level (0.98x).
bool uses_avx2_lut(const Geo& g, int64_t isa, bool channels_last_out) {
#if BNN_X86
  const int64_t mode = g_lut_mode.load();
  return (mode == LUT_ALWAYS || (mode == LUT_AUTO && g.Og > 16)) && isa == ISA_AVX2 && channels_last_out &&
         g.KH * g.KW * g.NWg <= AVX2_SHORT_WORDS && (g.G == 1 || g.Og % 64 == 0);
#else
  return false;  // the portable build has no AVX2 kernels
#endif
}

int64_t set_avx2_lut_op(int64_t mode) {
  TORCH_CHECK(mode >= LUT_NEVER && mode <= LUT_ALWAYS, "bnnslim runtime: set_avx2_lut takes 0, 1 or 2");
  return g_lut_mode.exchange(mode);
}

int64_t set_pair_taps_op(int64_t mode) {
  TORCH_CHECK(mode >= PAIR_NEVER && mode <= PAIR_ALWAYS, "bnnslim runtime: set_pair_taps takes 0, 1 or 2");
  return g_pair_mode.exchange(mode);
}

// Fill the second image of `buf` (made with images = 2) from its first: only the phases (of a stride SW) that
// paired taps read, those of the even taps 0, 2, 4, ... of a kernel KW wide.
void fill_pair_image(int64_t* buf, const Geo& g) {
  int64_t* pair = buf + g.N * g.img_stride;
  constexpr uint64_t LOW = 0xffffffffULL;
  std::vector<bool> read(g.SW, false);
  for (int64_t kw = 0; kw + 1 < g.KW; kw += 2) read[kw % g.SW] = true;
  at::parallel_for(0, g.N * g.Hp, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / g.Hp, r = t % g.Hp;
      for (int64_t j = 0; j < g.GW; ++j)
        for (int64_t k = 0; k < 2; ++k) {  // sign plane, nonzero plane
          const int64_t at = n * g.img_stride + r * g.row_stride + j * g.word_stride + k * g.plane;
          const uint64_t* src = reinterpret_cast<const uint64_t*>(buf + at);
          uint64_t* dst = reinterpret_cast<uint64_t*>(pair + at);
          for (int64_t p = 0; p < g.SW; ++p) {
            if (!read[p]) continue;
            // column iw = q * SW + p of phase p; its right neighbour iw + 1 is in phase p + 1 (same q) or, for
            // the last phase, in phase 0 at q + 1
            const int64_t cols = (g.Wp - p + g.SW - 1) / g.SW;  // columns of phase p
            const uint64_t* lo = src + p * g.Wq;
            const uint64_t* hi = p + 1 < g.SW ? src + (p + 1) * g.Wq : src + 1;
            const int64_t hi_cols = (g.Wp - (p + 1) + g.SW - 1) / g.SW;  // columns iw + 1 < Wp
            uint64_t* out = dst + p * g.Wq;
            for (int64_t q = 0; q < cols; ++q) out[q] = (lo[q] & LOW) | (q < hi_cols ? hi[q] << 32 : 0);
          }
        }
    }
  });
}

// Weights [G, OBg, KH, KW, 1, NB] -> [G, OBg, KH, ceil(KW / 2), 1, NB]: taps 2t and 2t + 1 in one word.
std::vector<int64_t> pair_weight_words(const int64_t* w, const Geo& g) {
  const int64_t KWp = ceil_div(g.KW, 2);
  std::vector<int64_t> out(g.G * g.OBg * g.KH * KWp * NB);
  for (int64_t row = 0; row < g.G * g.OBg * g.KH; ++row)
    for (int64_t t = 0; t < KWp; ++t)
      for (int64_t l = 0; l < NB; ++l) {
        const uint64_t lo = static_cast<uint64_t>(w[(row * g.KW + 2 * t) * NB + l]) & 0xffffffffULL;
        const uint64_t hi = 2 * t + 1 < g.KW ? static_cast<uint64_t>(w[(row * g.KW + 2 * t + 1) * NB + l]) << 32 : 0;
        out[(row * KWp + t) * NB + l] = static_cast<int64_t>(lo | hi);
      }
  return out;
}

// What a layer's kernels derive from its packed weights and thresholds, made on its first call and kept by its
// PackedConvCall (conv_impl makes a fresh one for each call through the plain ops): the paired-taps weights
// (pair_weight_words), and for the AVX2 short kernel the nibbles and the per-word OR (nibble_weights), one set
// for the plain and one for the paired-taps layout, and the 16-bit threshold tables of the AVX2 and AVX-512
// short kernels (short_thresholds, block_thresholds).
struct DerivedWeights {
  std::once_flag paired_made, nibbles_made[2], thr16_made, blocks_made;
  std::vector<int64_t> pair_words, wnib[2], wor[2], wpop[2];
  std::vector<int16_t> thr16, thr_blocks;
  std::vector<uint8_t> flip_blocks;
#if BNN_X86
  std::once_flag lut_made;
  LutWeights lut;  // conv_avx2_lut's weight nibbles and thresholds
#endif
};

at::Tensor conv_impl(const at::Tensor& packed, const Geo& g, const at::Tensor& wwords,
                     const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& bias, bool counts,
                     bool nhwc, int64_t isa, const c10::optional<at::Tensor>& thresholds,
                     const c10::optional<at::Tensor>& clamp, bool paired = false,
                     DerivedWeights* derived = nullptr) {
  TORCH_CHECK(wwords.device().is_cpu() && wwords.scalar_type() == at::kLong && wwords.is_contiguous() &&
                  wwords.dim() == 6,
              "bnnslim runtime: packed weights must be contiguous int64 [G, OBg, KH, KW, NWg, 8] on the CPU");
  TORCH_CHECK(wwords.size(0) == g.G && wwords.size(1) == g.OBg && wwords.size(2) == g.KH &&
                  wwords.size(3) == g.KW && wwords.size(4) == g.NWg && wwords.size(5) == NB,
              "bnnslim runtime: packed weights ", wwords.sizes(), " do not match the layer (groups ", g.G,
              ", ", g.Cg, " inputs per group, ", g.O, " outputs, kernel ", g.KH, "x", g.KW, ")");
  at::Tensor a_t, b_t;
  std::vector<int64_t> offs;
  DerivedWeights per_call;  // a layer called through the plain ops derives them on every call
  if (derived == nullptr) derived = &per_call;
  const int64_t* weights = wwords.data_ptr<int64_t>();
  if (paired) {  // the packed input has the paired image after its own (see fill_pair_image)
    fill_pair_image(packed.data_ptr<int64_t>(), g);
    std::call_once(derived->paired_made, [&] { derived->pair_words = pair_weight_words(weights, g); });
    weights = derived->pair_words.data();
    for (int64_t kh = 0; kh < g.KH; ++kh)
      for (int64_t kw = 0; kw < g.KW; kw += 2)
        offs.push_back(tap_offset(g, kh, kw, 0) + (kw + 1 < g.KW ? g.N * g.img_stride : 0));
  } else {
    for (int64_t kh = 0; kh < g.KH; ++kh)
      for (int64_t kw = 0; kw < g.KW; ++kw)
        for (int64_t j = 0; j < g.NWg; ++j) offs.push_back(tap_offset(g, kh, kw, j));
  }
  ConvArgs args{&g,     packed.data_ptr<int64_t>(), weights, nullptr, nullptr, nullptr, nullptr,
                offs.data(), static_cast<int64_t>(offs.size()), nhwc, nullptr, nullptr, ceil_div(g.O, 64)};
  if (alpha.has_value() && alpha->defined()) {
    a_t = as_type(*alpha, at::kFloat);
    TORCH_CHECK(a_t.numel() == g.O, "bnnslim runtime: alpha must have one value per output channel");
    args.alpha = a_t.data_ptr<float>();
  }
  if (bias.has_value() && bias->defined()) {
    b_t = as_type(*bias, at::kFloat);
    TORCH_CHECK(b_t.numel() == g.O, "bnnslim runtime: bias must have one value per output channel");
    args.bias = b_t.data_ptr<float>();
  }
  at::Tensor thr_t, out;
  if (thresholds.has_value() && thresholds->defined()) {
    thr_t = as_type(*thresholds, at::kInt);
    TORCH_CHECK(thr_t.numel() == 3 * g.O, "bnnslim runtime: thresholds must be int32 [out_channels, 3]");
    args.thr = thr_t.data_ptr<int32_t>();
    out = zeros_long({g.N, g.OH, g.OW, args.NWo, 2});
    args.bits = out.data_ptr<int64_t>();
  } else {
    const auto format = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    out = at::Tensor(at::detail::empty_cpu({g.N, g.O, g.OH, g.OW}, counts ? at::kInt : at::kFloat,
                                           /*pin_memory=*/false, format));
    if (counts) {
      args.counts = out.data_ptr<int32_t>();
    } else {
      args.out = out.data_ptr<float>();
    }
  }
#if BNN_X86
  // AVX2 dot products of up to AVX2_SHORT_WORDS run on blocks of 4 pixels: on the nibble tables where they run,
  // else on the pixel lanes (conv_avx2_short); each kernel derives its weights and thresholds once per layer
  const bool avx2_short = isa == ISA_AVX2 && args.kk <= AVX2_SHORT_WORDS;
  const bool avx2_lut = !paired && uses_avx2_lut(g, isa, args.thr != nullptr || nhwc);
  if (avx2_lut) {
    std::call_once(derived->lut_made, [&] { derived->lut = lut_weights(g, args.wts, args.kk, args.thr); });
  } else if (avx2_short) {
    if (args.thr != nullptr) {
      std::call_once(derived->thr16_made, [&] { derived->thr16 = short_thresholds(g, args.thr); });
      args.thr16 = derived->thr16.data();
    }
    std::call_once(derived->nibbles_made[paired], [&] {
      nibble_weights(g, args.wts, args.kk, derived->wnib[paired], derived->wor[paired], derived->wpop[paired]);
    });
    args.wnib = derived->wnib[paired].data();
    args.wor = derived->wor[paired].data();
    args.wpop = derived->wpop[paired].data();
  }
#endif
  // Work items: (image, group, range of pixel vectors); each covers all output
  // channels of its group so its packed rows stay in L1 while weights stream.
#if BNN_X86
  int64_t unit = 1;  // pixels per work unit
  bool channel_lanes = false;
  if (isa == ISA_AVX512) {
    channel_lanes = use_channel_lanes(g);
    unit = channel_lanes ? 1 : 8;
    if (!channel_lanes && args.kk <= SHORT_WORDS && args.thr != nullptr) {
      std::call_once(derived->blocks_made,
                     [&] { block_thresholds(g, args.thr, derived->thr_blocks, derived->flip_blocks); });
      args.thr_blocks = derived->thr_blocks.data();
      args.flip_blocks = derived->flip_blocks.data();
    }
  }
  if (isa == ISA_AVX2) unit = 4;
  const int64_t nvec = avx2_short ? avx2_short_blocks(g) : g.OH * ceil_div(g.OW, unit);
  const int64_t chunk = std::min<int64_t>(nvec, channel_lanes ? 2 * NPCH : 2 * NP512);
#else
  const int64_t nvec = g.OH * g.OW, chunk = std::min<int64_t>(nvec, 4);  // the portable kernel: pixel by pixel
#endif
  const int64_t items_per_img = ceil_div(nvec, chunk);
  const int64_t total = g.N * g.G * items_per_img;
  at::parallel_for(0, total, 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t n = it / (g.G * items_per_img);
      const int64_t gi = (it / items_per_img) % g.G;
      const int64_t c = it % items_per_img;
      const int64_t vb = c * chunk, ve = std::min(nvec, vb + chunk);
      switch (isa) {
#if BNN_X86
        case ISA_AVX512:
          if (channel_lanes) {
            conv_avx512_ch(args, n, gi, vb, ve);
          } else {
            conv_avx512(args, n, gi, vb, ve);
          }
          break;
        case ISA_AVX2:
          if (avx2_lut) {
            conv_avx2_lut(args, derived->lut, n, gi, vb, ve);
          } else if (avx2_short) {
            conv_avx2_short(args, n, gi, vb, ve);
          } else {
            conv_avx2(args, n, gi, vb, ve);
          }
          break;
        case ISA_POPCNT: conv_popcnt(args, n, gi, vb, ve); break;
#endif
        default: conv_scalar(args, n, gi, vb, ve); break;
      }
    }
  });
  if (clamp.has_value() && clamp->defined() && args.out != nullptr) {
    // a following Hardtanh / ReLU folded in (fuse.py): min(max(y, lo), hi) on the finished values
    const at::Tensor c_t = as_type(*clamp, at::kFloat);
    TORCH_CHECK(c_t.numel() == 2, "bnnslim runtime: clamp must be float32 [lo, hi]");
    const float lo = c_t.data_ptr<float>()[0], hi = c_t.data_ptr<float>()[1];
    float* y = args.out;
    const int64_t count = out.numel();
    for (int64_t i = 0; i < count; ++i) y[i] = std::min(std::max(y[i], lo), hi);
  }
  return out;
}

// ---------------------------------------------------------------- ops

at::Tensor pack_input_op(const at::Tensor& x, at::IntArrayRef padding, int64_t stride_w, int64_t groups,
                         const c10::optional<at::Tensor>& in_mask, int64_t isa) {
  isa = resolve_isa(isa);
  // a 1x1 kernel geometry: only the packing fields are used
  const std::vector<int64_t> stride{1, stride_w}, dil{1, 1};
  const Geo g = make_geo(x, groups, 1, 1, stride, padding, dil, groups);
  return pack_impl(x, g, in_mask, isa);
}

at::Tensor binary_conv2d_impl(const at::Tensor& x, const at::Tensor& wwords, const c10::optional<at::Tensor>& alpha,
                              const c10::optional<at::Tensor>& bias, int64_t out_channels, int64_t kh, int64_t kw,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, const c10::optional<at::Tensor>& in_mask, bool counts, int64_t isa,
                              const c10::optional<at::Tensor>& thresholds, const c10::optional<at::Tensor>& clamp,
                              DerivedWeights* derived) {
  isa = resolve_isa(isa);
  const Geo g = make_geo(x, out_channels, kh, kw, stride, padding, dilation, groups);
  // like torch's conv: the output keeps a channels-last input's memory format
  const bool nhwc = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const bool has_thresholds = thresholds.has_value() && thresholds->defined();
  const bool paired = pairs_taps(g, isa) && !uses_avx2_lut(g, isa, has_thresholds || nhwc);
  const at::Tensor packed = pack_impl(x, g, in_mask, isa, paired ? 2 : 1);
  return conv_impl(packed, g, wwords, alpha, bias, counts, nhwc, isa, thresholds, clamp, paired, derived);
}

at::Tensor binary_conv2d_op(const at::Tensor& x, const at::Tensor& wwords, const c10::optional<at::Tensor>& alpha,
                            const c10::optional<at::Tensor>& bias, int64_t out_channels, int64_t kh, int64_t kw,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups, const c10::optional<at::Tensor>& in_mask, bool counts, int64_t isa,
                            const c10::optional<at::Tensor>& thresholds, const c10::optional<at::Tensor>& clamp) {
  return binary_conv2d_impl(x, wwords, alpha, bias, out_channels, kh, kw, stride, padding, dilation, groups, in_mask,
                            counts, isa, thresholds, clamp, nullptr);
}

at::Tensor binary_conv2d_bits_impl(const at::Tensor& bits, int64_t in_channels, const at::Tensor& wwords,
                                   const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& bias,
                                   int64_t out_channels, int64_t kh, int64_t kw, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                   const c10::optional<at::Tensor>& in_mask, bool counts, int64_t isa,
                                   const c10::optional<at::Tensor>& thresholds,
                                   const c10::optional<at::Tensor>& clamp, DerivedWeights* derived) {
  isa = resolve_isa(isa);
  TORCH_CHECK(bits.dim() == 5, "bnnslim runtime: packed activations must be int64 [N, H, W, NW, 2]");
  const Geo g = make_geo_dims(bits.size(0), in_channels, bits.size(1), bits.size(2), out_channels, kh, kw, stride,
                              padding, dilation, groups);
  const bool paired = pairs_taps(g, isa) && !uses_avx2_lut(g, isa, /*channels_last_out=*/true);
  const at::Tensor packed = pack_from_bits(bits, g, in_mask, paired ? 2 : 1);
  return conv_impl(packed, g, wwords, alpha, bias, counts, /*nhwc=*/true, isa, thresholds, clamp, paired, derived);
}

at::Tensor binary_conv2d_bits_op(const at::Tensor& bits, int64_t in_channels, const at::Tensor& wwords,
                                 const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& bias,
                                 int64_t out_channels, int64_t kh, int64_t kw, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                 const c10::optional<at::Tensor>& in_mask, bool counts, int64_t isa,
                                 const c10::optional<at::Tensor>& thresholds,
                                 const c10::optional<at::Tensor>& clamp) {
  return binary_conv2d_bits_impl(bits, in_channels, wwords, alpha, bias, out_channels, kh, kw, stride, padding,
                                 dilation, groups, in_mask, counts, isa, thresholds, clamp, nullptr);
}

// clamp(out + residual, lo, hi) written into `out`, a fresh conv output: a residual add and the activation
// after it (blocks.py) in one pass over memory. The loop runs where both have the same shape, dtype (float32)
// and memory layout; otherwise ATen's add and clamp, which also give torch's type promotion and broadcasting.
// The same floats as torch's `(a + b).clamp_(lo, hi)`: one rounded add, then max / min (a NaN passes through).
at::Tensor add_clamp_into_op(at::Tensor out, const at::Tensor& residual, double lo, double hi) {
  if (out.scalar_type() == at::kFloat && residual.scalar_type() == at::kFloat && residual.device().is_cpu() &&
      out.sizes() == residual.sizes() && out.strides() == residual.strides() && out.is_non_overlapping_and_dense()) {
    float* y = out.data_ptr<float>();
    const float* r = residual.data_ptr<float>();
    const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
    const int64_t count = out.numel();
    for (int64_t i = 0; i < count; ++i) y[i] = std::min(std::max(y[i] + r[i], flo), fhi);
    return out;
  }
  const bool in_place = at::IntArrayRef(at::infer_size(out.sizes(), residual.sizes())) == out.sizes() &&
                        at::result_type(out, residual) == out.scalar_type();
  if (in_place) return out.add_(residual).clamp_(lo, hi);
  return at::add(out, residual).clamp_(lo, hi);
}

// A packed conv's fixed arguments held on the C++ side (PackedBinaryConv2d's fast path): a call converts only
// its input, not the seventeen arguments the op takes, which cost as much as a small layer's arithmetic.
struct PackedConvCall {
  bool input_bits;
  int64_t in_channels;
  at::Tensor wwords;
  c10::optional<at::Tensor> alpha, bias;
  int64_t out_channels, kh, kw;
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  c10::optional<at::Tensor> in_mask;
  int64_t isa;
  c10::optional<at::Tensor> thresholds, clamp;
  std::shared_ptr<DerivedWeights> derived = std::make_shared<DerivedWeights>();  // shared by copies

  at::Tensor operator()(const at::Tensor& x) const {
    if (input_bits)
      return binary_conv2d_bits_impl(x, in_channels, wwords, alpha, bias, out_channels, kh, kw, stride, padding,
                                     dilation, groups, in_mask, false, isa, thresholds, clamp, derived.get());
    return binary_conv2d_impl(x, wwords, alpha, bias, out_channels, kh, kw, stride, padding, dilation, groups,
                              in_mask, false, isa, thresholds, clamp, derived.get());
  }

  // clamp(conv(x) + residual, lo, hi): a ResNet block's last conv, its residual add and the activation after it
  at::Tensor add_clamp(const at::Tensor& x, const at::Tensor& residual, double lo, double hi) const {
    return add_clamp_into_op((*this)(x), residual, lo, hi);
  }
};

// A block with a forward of its own (a ResNet BasicBlock), its planned graph (blocks.py) as one call: packed
// convs' kernel objects and residual adds on numbered values, value 0 the block's input. Each step is
// (kind, conv, src, residual, lo, hi); kinds: 0 conv(src); 1 clamp(conv(src) + residual) into the conv's output;
// 2 clamp(src + residual) into src (a fresh conv output nothing else reads); 3 clamp(src + residual) as a new
// tensor; 4 the program of a child block (`subs[conv]`) on src. Where the input is not what the convs reading it were made for (float32, 4-d, `in_channels` of them,
// on the CPU, no autograd) or a child of the block was replaced since the plan (`children`, the block's
// `_modules` then), the block's own forward runs instead: `fallback(x, stale)`, a Python callable, told whether
// the plan is stale (then every plan is made anew).
struct BlockProgram {
  std::vector<PackedConvCall> convs;
  std::vector<BlockProgram> subs;
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, double, double>> steps;
  int64_t in_channels;  // -1: no conv reads the input as floats
  int64_t out;          // the value returned
  pybind11::dict modules;
  std::vector<pybind11::object> children;  // strong references: a replaced child cannot come back at its address
  pybind11::object fallback;

  bool children_unchanged() const {
    if (static_cast<size_t>(PyDict_Size(modules.ptr())) != children.size()) return false;
    Py_ssize_t pos = 0;
    PyObject *key = nullptr, *value = nullptr;
    size_t i = 0;
    while (PyDict_Next(modules.ptr(), &pos, &key, &value))
      if (value != children[i++].ptr()) return false;
    return true;
  }

  at::Tensor operator()(const at::Tensor& x) const {
    const bool fits = x.scalar_type() == at::kFloat && x.dim() == 4 && x.is_cpu() &&
                      (in_channels < 0 || x.size(1) == in_channels) &&
                      !(x.requires_grad() && at::GradMode::is_enabled());
    const bool stale = !children_unchanged();
    if (!fits || stale) return fallback(x, stale).cast<at::Tensor>();
    std::vector<at::Tensor> v;
    v.reserve(steps.size() + 1);
    v.push_back(x);
    for (const auto& [kind, conv, src, residual, lo, hi] : steps) {
      switch (kind) {
        case 0: v.push_back(convs[conv](v[src])); break;
        case 1: v.push_back(convs[conv].add_clamp(v[src], v[residual], lo, hi)); break;
        case 2: v.push_back(add_clamp_into_op(v[src], v[residual], lo, hi)); break;
        case 4: v.push_back(subs[conv](v[src])); break;
        default: v.push_back(at::add(v[src], v[residual]).clamp_(lo, hi)); break;
      }
    }
    return v[out];
  }
};

// A bit max pooling's fixed arguments (PackedMaxPool2d's step in a plan).
struct PackedPoolCall {
  std::vector<int64_t> kernel, stride, padding, dilation;
  bool ceil_mode;

  at::Tensor operator()(const at::Tensor& x) const {
    return bits_max_pool2d_op(x, kernel, stride, padding, dilation, ceil_mode);
  }
};

// Consecutive C++ steps of a plan (segments.py: convs and bit poolings on packed bits, planned blocks), run in
// one call: at batch 1 each step called from Python costs a microsecond or two of argument conversion and tensor
// wrapping, as much as a 2x2 layer's arithmetic or a whole bit max pooling; here the intermediate tensors never
// reach Python.
struct PackedChain {
  std::vector<std::variant<PackedConvCall, PackedPoolCall, BlockProgram>> steps;

  explicit PackedChain(const std::vector<pybind11::object>& calls) {
    for (const pybind11::object& call : calls) {
      if (pybind11::isinstance<PackedConvCall>(call)) steps.emplace_back(call.cast<PackedConvCall>());
      else if (pybind11::isinstance<PackedPoolCall>(call)) steps.emplace_back(call.cast<PackedPoolCall>());
      else steps.emplace_back(call.cast<BlockProgram>());
    }
  }

  at::Tensor operator()(at::Tensor x) const {
    for (const auto& step : steps) x = std::visit([&](const auto& call) { return call(x); }, step);
    return x;
  }
};

// ---------------------------------------------------------------- peak microbenchmark
//
// XNOR-popcount throughput on L1-resident data: sum popcount((a ^ w) & z) over
// `words` 64-bit words, `reps` times; returns the total (so the work is kept).
// method 0: scalar popcnt; 1: AVX2 nibble lookup (pshufb, the conv kernel's
// method); 2: AVX2 Harley-Seal (carry-save adders, one lookup per 16 vectors);
// 3: AVX-512 VPOPCNTDQ. The caller times it (benchmarks/runtime_popcount_peak.py).
#if BNN_X86
BNN_POPCNT int64_t peak_scalar(const uint64_t* a, const uint64_t* w, const uint64_t* z, int64_t words,
                               int64_t reps) {
  int64_t total = 0;
  for (int64_t r = 0; r < reps; ++r) {
    int64_t t0 = 0, t1 = 0, t2 = 0, t3 = 0;
    for (int64_t i = 0; i + 4 <= words; i += 4) {
      t0 += __builtin_popcountll((a[i] ^ w[i]) & z[i]);
      t1 += __builtin_popcountll((a[i + 1] ^ w[i + 1]) & z[i + 1]);
      t2 += __builtin_popcountll((a[i + 2] ^ w[i + 2]) & z[i + 2]);
      t3 += __builtin_popcountll((a[i + 3] ^ w[i + 3]) & z[i + 3]);
    }
    total += t0 + t1 + t2 + t3;
    asm volatile("" : : "r"(a) : "memory");
  }
  return total;
}

BNN_AVX2 inline __m256i xnor_avx2(const uint64_t* a, const uint64_t* w, const uint64_t* z, int64_t i) {
  const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i));
  const __m256i vw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
  const __m256i vz = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(z + i));
  return _mm256_and_si256(_mm256_xor_si256(va, vw), vz);
}

BNN_AVX2 inline int64_t hsum_avx2(__m256i v) {
  alignas(32) int64_t t[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
  return t[0] + t[1] + t[2] + t[3];
}

BNN_AVX2 int64_t peak_pshufb(const uint64_t* a, const uint64_t* w, const uint64_t* z, int64_t words, int64_t reps) {
  const __m256i zero = _mm256_setzero_si256();
  int64_t total = 0;
  for (int64_t r = 0; r < reps; ++r) {
    __m256i acc = zero;
    for (int64_t i0 = 0; i0 < words; i0 += 4 * 31) {
      __m256i bytes = zero;
      const int64_t i1 = std::min<int64_t>(words, i0 + 4 * 31);
      for (int64_t i = i0; i + 4 <= i1; i += 4) bytes = _mm256_add_epi8(bytes, popcnt_bytes_avx2(xnor_avx2(a, w, z, i)));
      acc = _mm256_add_epi64(acc, _mm256_sad_epu8(bytes, zero));
    }
    total += hsum_avx2(acc);
    asm volatile("" : : "r"(a) : "memory");
  }
  return total;
}

BNN_AVX2 inline void csa_avx2(__m256i& h, __m256i& l, __m256i a, __m256i b, __m256i c) {
  const __m256i u = _mm256_xor_si256(a, b);
  h = _mm256_or_si256(_mm256_and_si256(a, b), _mm256_and_si256(u, c));
  l = _mm256_xor_si256(u, c);
}

BNN_AVX2 inline __m256i popcnt64_avx2(__m256i v) {
  return _mm256_sad_epu8(popcnt_bytes_avx2(v), _mm256_setzero_si256());
}

BNN_AVX2 int64_t peak_harley_seal(const uint64_t* a, const uint64_t* w, const uint64_t* z, int64_t words,
                                  int64_t reps) {
  int64_t total = 0;
  for (int64_t r = 0; r < reps; ++r) {
    __m256i acc = _mm256_setzero_si256(), ones = acc, twos = acc, fours = acc, eights = acc;
    __m256i twosA, twosB, foursA, foursB, eightsA, eightsB, sixteens;
    int64_t i = 0;
    for (; i + 64 <= words; i += 64) {
      csa_avx2(twosA, ones, ones, xnor_avx2(a, w, z, i), xnor_avx2(a, w, z, i + 4));
      csa_avx2(twosB, ones, ones, xnor_avx2(a, w, z, i + 8), xnor_avx2(a, w, z, i + 12));
      csa_avx2(foursA, twos, twos, twosA, twosB);
      csa_avx2(twosA, ones, ones, xnor_avx2(a, w, z, i + 16), xnor_avx2(a, w, z, i + 20));
      csa_avx2(twosB, ones, ones, xnor_avx2(a, w, z, i + 24), xnor_avx2(a, w, z, i + 28));
      csa_avx2(foursB, twos, twos, twosA, twosB);
      csa_avx2(eightsA, fours, fours, foursA, foursB);
      csa_avx2(twosA, ones, ones, xnor_avx2(a, w, z, i + 32), xnor_avx2(a, w, z, i + 36));
      csa_avx2(twosB, ones, ones, xnor_avx2(a, w, z, i + 40), xnor_avx2(a, w, z, i + 44));
      csa_avx2(foursA, twos, twos, twosA, twosB);
      csa_avx2(twosA, ones, ones, xnor_avx2(a, w, z, i + 48), xnor_avx2(a, w, z, i + 52));
      csa_avx2(twosB, ones, ones, xnor_avx2(a, w, z, i + 56), xnor_avx2(a, w, z, i + 60));
      csa_avx2(foursB, twos, twos, twosA, twosB);
      csa_avx2(eightsB, fours, fours, foursA, foursB);
      csa_avx2(sixteens, eights, eights, eightsA, eightsB);
      acc = _mm256_add_epi64(acc, popcnt64_avx2(sixteens));
    }
    acc = _mm256_slli_epi64(acc, 4);
    acc = _mm256_add_epi64(acc, _mm256_slli_epi64(popcnt64_avx2(eights), 3));
    acc = _mm256_add_epi64(acc, _mm256_slli_epi64(popcnt64_avx2(fours), 2));
    acc = _mm256_add_epi64(acc, _mm256_slli_epi64(popcnt64_avx2(twos), 1));
    acc = _mm256_add_epi64(acc, popcnt64_avx2(ones));
    for (; i + 4 <= words; i += 4) acc = _mm256_add_epi64(acc, popcnt64_avx2(xnor_avx2(a, w, z, i)));
    total += hsum_avx2(acc);
    asm volatile("" : : "r"(a) : "memory");
  }
  return total;
}

BNN_AVX512 int64_t peak_avx512(const uint64_t* a, const uint64_t* w, const uint64_t* z, int64_t words,
                               int64_t reps) {
  int64_t total = 0;
  for (int64_t r = 0; r < reps; ++r) {
    __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0;
    int64_t i = 0;
    for (; i + 16 <= words; i += 16) {
      const __m512i t0 = _mm512_ternarylogic_epi64(_mm512_loadu_si512(a + i), _mm512_loadu_si512(w + i),
                                                   _mm512_loadu_si512(z + i), 0x28);
      const __m512i t1 = _mm512_ternarylogic_epi64(_mm512_loadu_si512(a + i + 8), _mm512_loadu_si512(w + i + 8),
                                                   _mm512_loadu_si512(z + i + 8), 0x28);
      acc0 = _mm512_add_epi64(acc0, _mm512_popcnt_epi64(t0));
      acc1 = _mm512_add_epi64(acc1, _mm512_popcnt_epi64(t1));
    }
    total += _mm512_reduce_add_epi64(_mm512_add_epi64(acc0, acc1));
    asm volatile("" : : "r"(a) : "memory");
  }
  return total;
}
#endif

int64_t popcount_peak_op(const at::Tensor& a, const at::Tensor& w, const at::Tensor& z, int64_t method,
                         int64_t reps) {
  TORCH_CHECK(a.scalar_type() == at::kLong && a.is_contiguous() && w.sizes() == a.sizes() && z.sizes() == a.sizes()
                  && w.is_contiguous() && z.is_contiguous() && a.numel() % 64 == 0,
              "bnnslim runtime: popcount_peak takes three contiguous int64 tensors of 64k words");
  const auto* pa = reinterpret_cast<const uint64_t*>(a.data_ptr<int64_t>());
  const auto* pw = reinterpret_cast<const uint64_t*>(w.data_ptr<int64_t>());
  const auto* pz = reinterpret_cast<const uint64_t*>(z.data_ptr<int64_t>());
#if BNN_X86
  switch (method) {
    case 0: TORCH_CHECK(cpu_has(ISA_POPCNT), "no popcnt"); return peak_scalar(pa, pw, pz, a.numel(), reps);
    case 1: TORCH_CHECK(cpu_has(ISA_AVX2), "no avx2"); return peak_pshufb(pa, pw, pz, a.numel(), reps);
    case 2: TORCH_CHECK(cpu_has(ISA_AVX2), "no avx2"); return peak_harley_seal(pa, pw, pz, a.numel(), reps);
    case 3: TORCH_CHECK(cpu_has(ISA_AVX512), "no avx512 vpopcntdq"); return peak_avx512(pa, pw, pz, a.numel(), reps);
    default: break;
  }
#endif
  TORCH_CHECK(false, "bnnslim runtime: popcount_peak method ", method, " is not available on this CPU");
  return 0;
}

std::string isa_name_op(int64_t isa) { return isa_name(isa == ISA_AUTO ? best_isa() : isa); }
bool cpu_has_op(int64_t isa) { return cpu_has(isa); }

}  // namespace

TORCH_LIBRARY(bnnslim_rt, m) {
  m.def("pack_input(Tensor x, int[] padding, int stride_w, int groups, Tensor? in_mask, int isa) -> Tensor");
  m.def("binary_conv2d(Tensor x, Tensor wwords, Tensor? alpha, Tensor? bias, int out_channels, int kh, int kw, "
        "int[] stride, int[] padding, int[] dilation, int groups, Tensor? in_mask, bool counts, int isa, "
        "Tensor? thresholds, Tensor? clamp) -> Tensor");
  m.def("binary_conv2d_bits(Tensor bits, int in_channels, Tensor wwords, Tensor? alpha, Tensor? bias, "
        "int out_channels, int kh, int kw, int[] stride, int[] padding, int[] dilation, int groups, Tensor? in_mask, "
        "bool counts, int isa, Tensor? thresholds, Tensor? clamp) -> Tensor");
  m.def("bits_max_pool2d(Tensor bits, int[] kernel, int[] stride, int[] padding, int[] dilation, bool ceil_mode) "
        "-> Tensor");
  m.def("pack_signs(Tensor x, int isa, bool positive, Tensor? scale=None, Tensor? shift=None) -> Tensor");
  m.def("conv_sign_bits(Tensor x, Tensor w, Tensor b, int kh, int kw, int[] stride, int[] padding, int isa, "
        "bool positive) -> Tensor");
  m.def("conv_small_float(Tensor x, Tensor w, Tensor b, int kh, int kw, int[] stride, int[] padding, int isa, "
        "int out_channels, float lo, float hi) -> Tensor");
  m.def("pooled_linear(Tensor x, Tensor? w, Tensor? b, int channels) -> Tensor");
  m.def("isa_name(int isa) -> str", &isa_name_op);
  m.def("cpu_has(int isa) -> bool", &cpu_has_op);
}

TORCH_LIBRARY_IMPL(bnnslim_rt, CPU, m) {
  m.impl("pack_input", pack_input_op);
  m.impl("binary_conv2d", binary_conv2d_op);
  m.impl("binary_conv2d_bits", binary_conv2d_bits_op);
  m.impl("bits_max_pool2d", bits_max_pool2d_op);
  m.impl("pack_signs", pack_signs_op);
  m.impl("conv_sign_bits", conv_sign_bits_op);
  m.impl("conv_small_float", conv_small_float_op);
  m.impl("pooled_linear", pooled_linear_op);
}

// The same ops as a Python module: a direct pybind11 call costs a few
// microseconds less than torch.ops' boxed dispatch, which matters for the small
// layers of a batch-1 network (layers.py calls these on its fast path).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<PackedConvCall>(m, "PackedConvCall")
      .def(pybind11::init<bool, int64_t, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, int64_t,
                          int64_t, int64_t, std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, int64_t,
                          c10::optional<at::Tensor>, int64_t, c10::optional<at::Tensor>, c10::optional<at::Tensor>>())
      .def("__call__", &PackedConvCall::operator())
      .def("add_clamp", &PackedConvCall::add_clamp);
  pybind11::class_<PackedPoolCall>(m, "PackedPoolCall")
      .def(pybind11::init<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                          bool>())
      .def("__call__", &PackedPoolCall::operator());
  pybind11::class_<BlockProgram>(m, "BlockProgram")
      .def(pybind11::init<std::vector<PackedConvCall>, std::vector<BlockProgram>,
                          std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, double, double>>, int64_t,
                          int64_t, pybind11::dict, std::vector<pybind11::object>, pybind11::object>())
      .def("__call__", &BlockProgram::operator())
      .def_readonly("steps", &BlockProgram::steps);
  pybind11::class_<PackedChain>(m, "PackedChain")
      .def(pybind11::init<const std::vector<pybind11::object>&>())
      .def("__call__", &PackedChain::operator())
      .def("__len__", [](const PackedChain& c) { return c.steps.size(); });
  m.def("binary_conv2d", &binary_conv2d_op);
  m.def("binary_conv2d_bits", &binary_conv2d_bits_op);
  m.def("bits_max_pool2d", &bits_max_pool2d_op);
  m.def("pack_signs", &pack_signs_op);
  m.def("conv_sign_bits", &conv_sign_bits_op);
  m.def("conv_small_float", &conv_small_float_op);
  m.def("pooled_linear", &pooled_linear_op);
  m.def("popcount_peak", &popcount_peak_op);
  m.def("set_pair_taps", &set_pair_taps_op);  // 0 never, 1 where it pays, 2 always; returns the previous mode
  m.def("set_avx2_lut", &set_avx2_lut_op);  // 0 never, 1 where it pays, 2 wherever it can; returns the previous mode
}
