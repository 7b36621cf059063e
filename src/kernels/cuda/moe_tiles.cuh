// Row tiles of the grouped expert GEMMs (moe_grouped.cu, moe_grouped_fp8.cu): tiles are numbered expert by
// expert, each expert's rows cut into GM-row tiles, so a block finds its (expert, tile) from the device offsets
// alone (no host synchronisation).
#pragma once
#include <cstdint>

#include <cooperative_groups.h>

#include "kernels/cuda/common.cuh"

namespace dsv3::cuda::dev {

// A warp's count of the row tiles: lane l holds experts [e0, e1), their cnt tiles, and inc the tiles of experts
// before e1 (an inclusive scan over the lanes).
struct LaneTiles {
  int e0, e1, cnt, inc;
};
template <int GM>
__device__ __forceinline__ LaneTiles lane_tiles(const int32_t* __restrict__ off, int E) {
  const int lane = threadIdx.x & 31;
  const int per = (E + 31) / 32, e0 = min(E, lane * per), e1 = min(E, e0 + per);
  int cnt = 0;
  for (int e = e0; e < e1; ++e) cnt += (off[e + 1] - off[e] + GM - 1) / GM;
  int inc = cnt;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += v;
  }
  return {e0, e1, cnt, inc};
}

// The (expert, row tile) of blockIdx.y: tiles are numbered expert by expert; -1 past the last.
template <int GM>
__device__ void find_tile(const int32_t* __restrict__ off, int E, int* e_out, int* mt_out) {
  const int lane = threadIdx.x & 31, my = int(blockIdx.y);
  const LaneTiles lt = lane_tiles<GM>(off, E);
  if (lane == 0) *e_out = -1;
  __syncwarp();
  int start = lt.inc - lt.cnt;
  if (my >= start && my < lt.inc) {
    for (int e = lt.e0; e < lt.e1; ++e) {
      const int t = (off[e + 1] - off[e] + GM - 1) / GM;
      if (my < start + t) {
        *e_out = e;
        *mt_out = my - start;
        break;
      }
      start += t;
    }
  }
}

// Persistent tile loops: ts[e] = the first row tile of expert e in that numbering, ts[E] = their count (warp 0
// writes ts[0 .. E]), and the expert of row tile m found by binary search over ts.
template <int GM>
__device__ void tile_starts(const int32_t* __restrict__ off, int E, int* ts) {
  const LaneTiles lt = lane_tiles<GM>(off, E);
  int start = lt.inc - lt.cnt;
  for (int e = lt.e0; e < lt.e1; ++e) {
    ts[e] = start;
    start += (off[e + 1] - off[e] + GM - 1) / GM;
  }
  if ((threadIdx.x & 31) == 31) ts[E] = lt.inc;
}
// The expert of row tile m < ts[E]: the e with ts[e] <= m < ts[e + 1] (experts without rows have ts[e] == ts[e + 1]).
__device__ __forceinline__ int tile_expert(const int* ts, int E, int m) {
  int lo = 0, hi = E;  // ts[lo] <= m < ts[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (ts[mid] <= m) lo = mid;
    else hi = mid;
  }
  return lo;
}

// The output of a block's GM x GN tile from its mma accumulators acc[MT][NT] (warp (wm, lane); col0(i): the tile
// column of the warp's n8 tile i). SWIGLU: gate tiles first, their up tiles NT / 2 later; h = bf16(silu(g)·u)
// at columns nj·GN/2 + ..; else f32 (bf16 with out_bf16) at nj·GN + ... Rows >= row_end and columns >= N are not stored. With splits > 1
// (K split over a cluster along z; not SWIGLU) the blocks' partial tiles are summed through distributed shared
// memory in rank order (deterministic), reusing `smem` (>= GM·GN floats) once every warp is done with it.
template <bool SWIGLU, int GM, int GN, int MT, int NT, int THREADS, class Col0>
__device__ __forceinline__ void store_tile(float (&acc)[MT][NT][4], Col0 col0, int wm, int splits, void* smem, int row0, int row_end,
                                           int nj, int N, void* out, int ldo, bool out_bf16 = false) {
  const int t = threadIdx.x, lane = t & 31, gq = lane >> 2, tq = lane & 3;
  if constexpr (!SWIGLU) {
    if (splits > 1) {
      namespace cg = cooperative_groups;
      __syncthreads();
      float* part = static_cast<float*>(smem);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const int rr = wm * 16 * MT + mt * 16 + gq + 8 * half, cc = col0(nt) + 2 * tq;
            part[rr * GN + cc] = acc[mt][nt][2 * half];
            part[rr * GN + cc + 1] = acc[mt][nt][2 * half + 1];
          }
      cg::cluster_group cl = cg::this_cluster();
      cl.sync();
      const int z = int(blockIdx.z), rows_per = (GM + splits - 1) / splits, r0 = z * rows_per, r1 = min(GM, r0 + rows_per);
      for (int i = t; i < (r1 - r0) * GN; i += THREADS) {  // rows dealt over the ranks
        const int rr = r0 + i / GN, cc = i % GN, row = row0 + rr, col = nj * GN + cc;
        float v = 0.0f;
        for (int q = 0; q < splits; ++q) v += cl.map_shared_rank(part, q)[rr * GN + cc];
        if (row < row_end && col < N) {
          if (out_bf16) static_cast<uint16_t*>(out)[int64_t(row) * ldo + col] = f32_to_bf16(v);
          else static_cast<float*>(out)[int64_t(row) * ldo + col] = v;
        }
      }
      cl.sync();  // no block leaves while another still reads its partial tile
      return;
    }
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + wm * 16 * MT + mt * 16 + gq + 8 * half;
      if (row >= row_end) continue;
      if constexpr (SWIGLU) {
        uint16_t* h = static_cast<uint16_t*>(out) + int64_t(row) * ldo;
#pragma unroll
        for (int nt = 0; nt < NT / 2; ++nt) {
          const int j = nj * (GN / 2) + col0(nt) + 2 * tq;
          if (j >= N) continue;
          float r[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float gv = acc[mt][nt][2 * half + c], uv = acc[mt][nt + NT / 2][2 * half + c];
            r[c] = gv / (1.0f + expf(-gv)) * uv;  // k_silu_mul's expression
          }
          *reinterpret_cast<uint32_t*>(h + j) = uint32_t(f32_to_bf16(r[0])) | (uint32_t(f32_to_bf16(r[1])) << 16);
        }
      } else if (out_bf16) {  // (the down product's bf16 expert outputs: half the bytes to write and to un-permute)
        uint16_t* o = static_cast<uint16_t*>(out) + int64_t(row) * ldo;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int j = nj * GN + col0(nt) + 2 * tq;
          if (j < N) *reinterpret_cast<uint32_t*>(o + j) = pack_bf16x2(acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]);
        }
      } else {
        float* o = static_cast<float*>(out) + int64_t(row) * ldo;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int j = nj * GN + col0(nt) + 2 * tq;
          if (j < N) *reinterpret_cast<float2*>(o + j) = make_float2(acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]);
        }
      }
    }
}

}  // namespace dsv3::cuda::dev

namespace dsv3::cuda {
// Launches kernel over `grid` with clusters of grid.z blocks along z (K split) as a programmatic dependent.
template <class Params>
void launch_k_split_cluster(void (*kernel)(Params), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const Params& p) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute at[2];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  at[1].id = cudaLaunchAttributeClusterDimension;
  at[1].val.clusterDim.x = 1, at[1].val.clusterDim.y = 1, at[1].val.clusterDim.z = grid.z;
  cfg.attrs = at;
  cfg.numAttrs = 2;
  DSV3_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
}
}  // namespace dsv3::cuda
