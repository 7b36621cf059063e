// Hopper warpgroup MMA (wgmma, sm_90a): shared-memory matrix descriptors for K-major tiles in the 128-byte swizzle
// and the bf16 m64n128k16 product with f32 accumulators, for kernels that stage both operands in shared memory
// (PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"). A tile is rows of 64 bf16 (128 bytes) in
// 1024-byte atoms of 8 rows, the 16-byte chunk c of row r stored at chunk c ^ (r % 8), the atom 1024-byte aligned;
// a k16 step inside the 64-wide row is the descriptor's start address plus 32 bytes.
#pragma once
#include <cstdint>

#include "kernels/cuda/common.cuh"

namespace dsv3::cuda::dev {

// Byte offset of 16-byte chunk c (0..7) of row r in a 128-byte-swizzled tile (rows of 128 bytes: K-major rows of
// 64 bf16, or an N-major operand's K rows of 64 n).
__device__ __forceinline__ uint32_t swizzle128(int r, int c) { return uint32_t(r) * 128u + uint32_t((c ^ (r & 7)) * 16); }
// The same in the 64-byte swizzle (rows of 32 bf16 in 512-byte atoms of 8 rows, 512-byte aligned): chunk c (0..3)
// of row r at chunk c ^ ((r / 2) % 4), the address bits 4-5 XOR bits 7-8 as the hardware applies it.
__device__ __forceinline__ uint32_t swizzle64(int r, int c) { return uint32_t(r) * 64u + uint32_t((c ^ ((r >> 1) & 3)) * 16); }

// A descriptor: start address, leading and stride byte offsets, swizzle mode (1: 128-byte, 2: 64-byte), each
// offset stored >> 4.
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo, uint32_t swizzle) {
  return uint64_t((addr & 0x3FFFFu) >> 4) | (uint64_t(lbo >> 4) << 16) | (uint64_t(sbo >> 4) << 32) | (uint64_t(swizzle) << 62);
}
// K-major, 128-byte swizzle: atoms of 8 rows 1024 bytes apart (the stride byte offset); the leading byte offset is
// unused in the swizzled K-major modes and set to 1 (16 bytes) as the ISA asks.
__device__ __forceinline__ uint64_t wgmma_desc_k128(uint32_t addr) { return wgmma_desc(addr, 16, 1024, 1); }
// K-major, 64-byte swizzle: atoms of 8 rows of 64 bytes, 512 bytes apart.
__device__ __forceinline__ uint64_t wgmma_desc_k64(uint32_t addr) { return wgmma_desc(addr, 16, 512, 2); }
// N-major B (imm-trans-b 1), 128-byte swizzle: K rows of 64 n (128 bytes), 8 K rows an atom, atoms along K 1024
// bytes apart (the stride byte offset); `lbo` the distance to the next 64 n (unused when N is 64).
__device__ __forceinline__ uint64_t wgmma_desc_mn128(uint32_t addr, uint32_t lbo) { return wgmma_desc(addr, lbo, 1024, 1); }

// The accumulator operands of an m64n128 (64 floats) / m64n64 (32) product, d[0] .. in order (%0 ..).
#define DSV3_WGMMA_D32                                                                                                 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]),  \
      "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), \
      "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
      "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define DSV3_WGMMA_D64                                                                                                 \
  DSV3_WGMMA_D32, "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),  \
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), \
      "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), \
      "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
// Their register lists in the instruction strings.
#define DSV3_WGMMA_R32 \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define DSV3_WGMMA_R64                                                                                                    \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61," \
  "%62,%63}"

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// (fence_proxy_async_smem, common.cuh: cp.async's writes made visible to wgmma's reads, by each writing thread
// before the barrier.)
// A register operand of products still in flight: after their wait_group, this "redefinition" keeps the compiler
// from reading accumulators or reusing A-fragment registers before the products are done (its view of the asm is
// that they were read and written when issued).
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// d (+)= A[64 x 16] · B[128 x 16]ᵀ, both K-major bf16 in shared memory; accumulate = false zero-initialises d.
// d's layout is mma.sync's C fragments: warp w of the warpgroup holds rows 16 w .. 16 w + 15, and d[4 j .. 4 j + 3]
// the n8 tile j (rows g and g + 8, columns 8 j + 2 (lane % 4) + {0, 1}).
__device__ __forceinline__ void wgmma_m64n128k16_bf16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " DSV3_WGMMA_R64
      ", %64, %65, p, 1, 1, 0, 0;\n}\n"
      : DSV3_WGMMA_D64
      : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));
}

// d (+)= A[64 x 32] · B[128 x 32]ᵀ in e4m3 (f32 accumulators), both K-major in shared memory (the only layout FP8
// wgmma takes): a 128-byte row is 128 e4m3, a k32 step 32 bytes; d as wgmma_m64n128k16_bf16's.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " DSV3_WGMMA_R64
      ", %64, %65, p, 1, 1;\n}\n"
      : DSV3_WGMMA_D64
      : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));
}

// d (+)= A[64 x 16] · B[64 x 16]ᵀ, both K-major in shared memory (d: 8 n8 tiles, the layout above).
__device__ __forceinline__ void wgmma_m64n64k16_bf16(float (&d)[32], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " DSV3_WGMMA_R32
      ", %32, %33, p, 1, 1, 0, 0;\n}\n"
      : DSV3_WGMMA_D32
      : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));
}

// d += A[64 x 16] · B[16 x 64]: A from registers (mma.sync's A fragments of m16n8k16, warp w of the warpgroup its
// rows 16 w ..), B N-major in shared memory (imm-trans-b 1: B's rows are K, its n contiguous).
__device__ __forceinline__ void wgmma_m64n64k16_bf16_rs_nmajor(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " DSV3_WGMMA_R32
      ", {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"
      : DSV3_WGMMA_D32
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

}  // namespace dsv3::cuda::dev
