// int4 (GGUF Q4_0) weights in tiles of 16 rows: the decode layout of lfm2/quant.py's int4 layers with groups
// of 32 on CPUs with AVX-512 VNNI (`QuantLinear.pack_tiles`), shared by qgemv.cpp (`qgemv`, `qgemm`, `qpack_`,
// `qunpack`) and moe.cpp (`moe_experts`).
//
// Why: in the file's layout a row's block of 32 values is 16 bytes, and the AVX2 GEMV spends ~6 vector
// operations on each (nibbles unpacked, vpmaddubsw + vpmaddwd, horizontal sums, the scale): on two Zen 4
// cores it read int4 weights at 36 GB/s where torch.sum read the same buffers at 52 (an LFM2-8B-A1B decode
// step's dense matrices, 2026-12-05). With 16 rows' blocks interleaved, one vpdpbusd multiplies 4 values of 16
// rows by 4 broadcast activations, and the 16 scales of a block are one vector: ~27 operations for 16 rows'
// blocks. llama.cpp repacks Q4_0 for the same reason (ggml-cpu/repack.cpp, its 8x8 layouts); kquant.cpp does
// the same for Q4_K.
//
// The layout moves bytes and never changes them, so a matrix keeps the shapes of its tensors, qweight uint8
// (N, K / 2) and scales float16 (N, K / 32), and N must be a multiple of 16. Tile t holds rows 16 t .. 16 t +
// 15, in qweight's rows 16 t .. and scales' rows 16 t .. of the file's layout:
// - qweight: block b (values 32 b .. 32 b + 31) of the 16 rows is 256 bytes at 256 b: four chunks of 64
//   bytes, where bytes 4 r .. 4 r + 3 of chunk g are bytes 4 g .. 4 g + 3 of row r's block (values 4 g + l in
//   the low nibbles, 16 + 4 g + l in the high ones, as the file stores them);
// - scales: block b's 16 scales (row order) at 16 b.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>

#include "activations.h"
#include "simd.h"

namespace lfm2_q4x16 {

constexpr int64_t kRows = 16;         // rows of a tile
constexpr int64_t kBlockBytes = 256;  // a tile's block: 16 rows x 16 bytes

// The checks of an operator's call on matrices in tiles: int4 with groups of 32, `rows` in whole tiles, and a
// CPU that runs the tiles' code.
inline void check(int64_t bits, int64_t group_size, int64_t rows, const char* op) {
  TORCH_CHECK(bits == 4 && group_size == 32 && rows % kRows == 0, "lfm2 ", op,
              ": 16-row tiles hold int4 weights with groups of 32 and rows in multiples of 16; got ", bits,
              " bits, group_size ", group_size, ", ", rows, " rows");
  TORCH_CHECK(LFM2_AVX2 && lfm2_simd::cpu_has_vnni512(), "lfm2 ", op,
              ": int4 weights in 16-row tiles need AVX-512 VNNI; restore the file's layout with qunpack");
}

// 16 rows of int4 blocks (stride row_bytes, nb blocks) and their scales (stride nb) into one tile.
inline void pack(const uint8_t* rows, const at::Half* scales, int64_t row_bytes, int64_t nb, uint8_t* tile,
                 at::Half* tile_scales) {
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t r = 0; r < kRows; ++r) {
      for (int g = 0; g < 4; ++g) std::memcpy(tile + b * kBlockBytes + 64 * g + 4 * r, rows + r * row_bytes + b * 16 + 4 * g, 4);
      tile_scales[b * kRows + r] = scales[r * nb + b];
    }
}

// One tile back to 16 rows of the file's layout.
inline void unpack(const uint8_t* tile, const at::Half* tile_scales, int64_t row_bytes, int64_t nb, uint8_t* rows,
                   at::Half* scales) {
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t r = 0; r < kRows; ++r) {
      for (int g = 0; g < 4; ++g) std::memcpy(rows + r * row_bytes + b * 16 + 4 * g, tile + b * kBlockBytes + 64 * g + 4 * r, 4);
      scales[r * nb + b] = tile_scales[b * kRows + r];
    }
}

#if LFM2_AVX2
// Activation rows m0 .. m0 + MR - 1 (int8 per block of 32, lfm2_act::quantize_activations) against one tile of
// nb blocks: y[r * ldy + 0 .. 16). Per block, the low nibbles (values q + 8) and the high nibbles kept in place
// (16 (q + 8)) go to separate exact integer sums, the high one shifted down once; 8 x the activations' block
// sum takes the + 8 off; then one float multiply-add with the 16 rows' scales. The same integers as qgemv.cpp's
// `dot_q8<4>`, summed over blocks in another order. No software prefetch: a tile is one sequential stream
// (kquant.cpp measured its Q4_K tiles no faster with one).
template <int MR>
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"))) inline void rows(
    const uint8_t* tile, const at::Half* tile_scales, int64_t nb, const lfm2_act::QActivations& a, int64_t m0,
    float* y, int64_t ldy) {
  const __m512i lo4 = _mm512_set1_epi8(0x0F), hi4 = _mm512_set1_epi8(static_cast<char>(0xF0));
  const int8_t* xq[MR];
  const float* xd[MR];
  const int32_t* xs[MR];
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) {
    xq[r] = a.q.data() + (m0 + r) * nb * lfm2_act::kBlock;
    xd[r] = a.d.data() + (m0 + r) * nb;
    xs[r] = a.sum.data() + (m0 + r) * nb;
    acc[r] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* t = tile + b * kBlockBytes;
    __m512i lo[MR], hi[MR];
    for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm512_setzero_si512();
    for (int g = 0; g < 4; ++g) {
      const __m512i w = _mm512_loadu_si512(t + 64 * g);
      const __m512i wl = _mm512_and_si512(w, lo4), wh = _mm512_and_si512(w, hi4);
      for (int r = 0; r < MR; ++r) {
        int32_t x0, x1;
        std::memcpy(&x0, xq[r] + b * lfm2_act::kBlock + 4 * g, 4);
        std::memcpy(&x1, xq[r] + b * lfm2_act::kBlock + 16 + 4 * g, 4);
        lo[r] = _mm512_dpbusd_epi32(lo[r], wl, _mm512_set1_epi32(x0));
        hi[r] = _mm512_dpbusd_epi32(hi[r], wh, _mm512_set1_epi32(x1));
      }
    }
    const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile_scales + b * kRows)));
    for (int r = 0; r < MR; ++r) {
      const __m512i isum = _mm512_sub_epi32(_mm512_add_epi32(lo[r], _mm512_srai_epi32(hi[r], 4)),
                                            _mm512_set1_epi32(8 * xs[r][b]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(sc, _mm512_set1_ps(xd[r][b])), acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(y + r * ldy, acc[r]);
}

// Every activation row against one tile, four at a time (the tile read from cache again per four).
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"))) inline void tile(
    const uint8_t* t, const at::Half* ts, int64_t nb, const lfm2_act::QActivations& a, int64_t m_rows, float* y,
    int64_t ldy) {
  int64_t m = 0;
  for (; m + 4 <= m_rows; m += 4) rows<4>(t, ts, nb, a, m, y + m * ldy, ldy);
  for (; m + 2 <= m_rows; m += 2) rows<2>(t, ts, nb, a, m, y + m * ldy, ldy);
  if (m < m_rows) rows<1>(t, ts, nb, a, m, y + m * ldy, ldy);
}
#endif

}  // namespace lfm2_q4x16
