// Row tiles of the grouped expert GEMMs (moe_grouped.cu, moe_grouped_fp8.cu): tiles are numbered expert by
// expert, each expert's rows cut into GM-row tiles, so a block finds its (expert, tile) from the device offsets
// alone (no host synchronisation).
#pragma once
#include <cstdint>

namespace dsv3::cuda::dev {

// The (expert, row tile) of blockIdx.y: tiles are numbered expert by expert; -1 past the last.
template <int GM>
__device__ void find_tile(const int32_t* __restrict__ off, int E, int* e_out, int* mt_out) {
  const int lane = threadIdx.x & 31, my = int(blockIdx.y);
  const int per = (E + 31) / 32, e0 = min(E, lane * per), e1 = min(E, e0 + per);
  int cnt = 0;
  for (int e = e0; e < e1; ++e) cnt += (off[e + 1] - off[e] + GM - 1) / GM;
  int inc = cnt;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += v;
  }
  if (lane == 0) *e_out = -1;
  __syncwarp();
  int start = inc - cnt;
  if (my >= start && my < inc) {
    for (int e = e0; e < e1; ++e) {
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

}  // namespace dsv3::cuda::dev
