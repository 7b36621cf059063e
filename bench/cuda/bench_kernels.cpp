// CUDA kernel benchmark: device-to-device copy bandwidth (the memory ceiling), cuBLASLt bf16 and block-scaled
// FP8 GEMM rates at DeepSeek-V3 shapes, the absorbed-MLA decode attention's effective bandwidth at long
// contexts, and our decode GEMV's weight bandwidth. Each figure is the median of 20 event-timed runs after 3 warm-ups, on random data.
//   build-cuda/bench_cuda_kernels [--quick]
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_ops.h"

using namespace dsv3;
using namespace dsv3::cuda;

namespace {

// `before` runs ahead of each timed call, outside the timing (an L2 flush; it also keeps the GPU busy while the
// timed call is enqueued, so the launch latency is not counted).
float median_ms(const std::function<void()>& f, int reps = 20, int warm = 3, const std::function<void()>& before = {}) {
  for (int i = 0; i < warm; ++i) f();
  synchronize();
  EventTimer t;
  std::vector<float> v;
  for (int i = 0; i < reps; ++i) {
    if (before) before();
    t.start();
    f();
    v.push_back(t.stop_ms());
  }
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <class T>
DeviceBuffer<T> random_device(size_t n, std::mt19937_64& rng, const std::function<T(float)>& conv, float sd = 1.0f) {
  std::normal_distribution<float> nd(0.0f, sd);
  std::vector<T> h(n);
  for (auto& x : h) x = conv(nd(rng));
  DeviceBuffer<T> d(n);
  copy_to_device(d.get(), h.data(), n * sizeof(T));
  return d;
}

struct Row {
  std::string what, shape;
  double ms, value;
  const char* unit;
};
std::vector<Row> rows;
void add(std::string what, std::string shape, double ms, double value, const char* unit) {
  rows.push_back({std::move(what), std::move(shape), ms, value, unit});
  std::printf("  %-34s %-34s %9.3f ms %9.1f %s\n", rows.back().what.c_str(), rows.back().shape.c_str(), ms, value, unit);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  try {
    const DeviceInfo dev = device_info();
    std::printf("device: %s (sm_%d%d, %d SMs, %.1f GiB)\n", dev.name.c_str(), dev.cc_major, dev.cc_minor, dev.sm_count,
                double(dev.total_mem) / (1 << 30));
    std::mt19937_64 rng(7);
    auto bf = [](float x) { return f32_to_bf16(x); };
    auto f8 = [](float x) { return f32_to_fp8_e4m3_saturate(x * 64.0f); };
    auto f32 = [](float x) { return x; };

    {  // 1. Memory ceiling: a 2 GiB device-to-device copy, bytes read + written.
      const size_t bytes = size_t(1) << 31;
      DeviceBuffer<uint8_t> a(bytes), b(bytes);
      memset_device(a.get(), 1, bytes);
      const float ms = median_ms([&] { copy_on_device(b.get(), a.get(), bytes); }, 10);
      add("d2d copy (read+write)", "2 GiB", ms, 2.0 * double(bytes) / (ms * 1e-3) / 1e9, "GB/s");
    }

    {  // 2. GEMMs y[M,N] = x[M,K]·W[N,K]ᵀ.
      Gemm gemm;
      struct S { int64_t M, N, K; const char* name; };
      std::vector<S> shapes = {{8192, 8192, 8192, "square"},          {4096, 24576, 1536, "q_b_proj, 4096 tok"},
                               {4096, 7168, 16384, "o_proj, 4096 tok"}, {4096, 4096, 7168, "expert gate|up, 4096 tok"},
                               {4096, 7168, 2048, "expert down, 4096 tok"}, {128, 7168, 2048, "expert down, 128 tok"}};
      if (quick) shapes.resize(2);
      for (const S& s : shapes) {
        const std::string shape = std::to_string(s.M) + "x" + std::to_string(s.N) + "x" + std::to_string(s.K) + " " + s.name;
        const double flop = 2.0 * double(s.M) * double(s.N) * double(s.K);
        auto x = random_device<uint16_t>(size_t(s.M * s.K), rng, bf);
        auto w = random_device<uint16_t>(size_t(s.N * s.K), rng, bf, 0.02f);
        DeviceBuffer<uint16_t> y(static_cast<size_t>(s.M * s.N));
        float ms = median_ms([&] { gemm.matmul(DType::BF16, x.get(), s.K, w.get(), s.K, DType::BF16, y.get(), s.N, s.M, s.N, s.K); });
        add("cuBLASLt bf16 GEMM", shape, ms, flop / (ms * 1e-3) / 1e12, "TFLOP/s");
        auto xq = random_device<uint8_t>(size_t(s.M * s.K), rng, f8);
        auto wq = random_device<uint8_t>(size_t(s.N * s.K), rng, f8);
        auto xs = random_device<float>(size_t(fp8_act_scale_count(s.M, s.K)), rng, [](float v) { return 0.01f + 0.001f * std::fabs(v); });
        auto ws = random_device<float>(size_t(ceil_div(s.N, 128) * ceil_div(s.K, 128)), rng, [](float v) { return 0.01f + 0.001f * std::fabs(v); });
        bool native = true;
        ms = median_ms([&] { native = gemm.matmul_fp8(xq.get(), xs.get(), wq.get(), ws.get(), DType::BF16, y.get(), s.N, s.M, s.N, s.K); });
        add(native ? "cuBLASLt FP8 1x128/128x128 GEMM" : "FP8 GEMM (FALLBACK bf16)", shape, ms, flop / (ms * 1e-3) / 1e12, "TFLOP/s");
        auto xf = random_device<float>(size_t(s.M * s.K), rng, f32);
        ms = median_ms([&] { gemm.linear_fp8(DType::F32, xf.get(), s.K, wq.get(), ws.get(), DType::BF16, y.get(), s.N, s.M, s.N, s.K); });
        add("  + on-the-fly f32 act quantize", shape, ms, flop / (ms * 1e-3) / 1e12, "TFLOP/s");
      }
    }

    {  // 3. Absorbed-MLA decode attention over a paged bf16 latent cache (block 64), one query token a sequence.
      // DeepSeek-V3's latent (576 = 512 + 64, tensor-core kernel), then small.json's (288 = 256 + 32, SIMT kernel) at
      // decode-step contexts.
      struct S { int64_t batch, H, L, W, R; };
      std::vector<S> shapes = {{1, 16, 32768, 576, 512},  {1, 16, 131072, 576, 512}, {1, 128, 32768, 576, 512},
                               {8, 16, 32768, 576, 512},  {32, 128, 8192, 576, 512}, {64, 16, 16384, 576, 512},
                               {128, 16, 4096, 576, 512}, {1, 16, 256, 288, 256},    {1, 16, 4096, 288, 256},
                               {64, 16, 256, 288, 256},   {1, 16, 32768, 288, 256},  {8, 16, 32768, 288, 256}};
      // Every timed call starts with a cold L2 (a 256 MiB buffer is cleared before it, as FlashMLA's benchmark does):
      // the smaller caches would otherwise be read from the 50 MB L2 on repeats.
      DeviceBuffer<uint8_t> flush(size_t(256) << 20);
      const auto flush_l2 = [&] { memset_device(flush.get(), 0, flush.size()); };
      if (quick) shapes.resize(2);
      for (const S& s : shapes) {
        const int64_t W = s.W, R = s.R, bs = 64, nblk = ceil_div(s.L, bs);
        LatentAttention p;
        p.batch = s.batch;
        p.s_q = 1;
        p.heads = s.H;
        p.W = W;
        p.R = R;
        p.block_size = bs;
        p.max_blocks = nblk;
        p.max_len = s.L;
        p.scale = 0.0417f;
        const size_t pool_rows = size_t(s.batch * nblk * bs);
        DeviceBuffer<uint16_t> pool(pool_rows * W);
        {  // random bf16 bits in a sane range, filled in chunks
          std::vector<uint16_t> h(size_t(1) << 24);
          std::normal_distribution<float> nd(0.0f, 1.0f);
          for (auto& v : h) v = f32_to_bf16(nd(rng));
          for (size_t off = 0; off < pool.size(); off += h.size())
            copy_to_device(pool.get() + off, h.data(), std::min(h.size(), pool.size() - off) * 2);
        }
        std::vector<int32_t> table(static_cast<size_t>(s.batch * nblk));
        for (size_t i = 0; i < table.size(); ++i) table[i] = int32_t(i);
        std::shuffle(table.begin(), table.end(), rng);
        std::vector<int32_t> pos(size_t(s.batch), int32_t(s.L - 1));
        DeviceBuffer<int32_t> dt(table.size()), dp(pos.size());
        copy_to_device(dt.get(), table.data(), table.size() * 4);
        copy_to_device(dp.get(), pos.data(), pos.size() * 4);
        auto q = random_device<float>(size_t(s.batch * s.H * W), rng, f32);
        DeviceBuffer<float> out(static_cast<size_t>(s.batch * s.H * R));
        DeviceBuffer<uint8_t> ws(attention_latent_workspace_bytes(p));
        const float ms = median_ms([&] {
          attention_latent(p, q.get(), DType::BF16, pool.get(), dt.get(), dp.get(), out.get(), ws.get(), ws.size());
        }, 20, 3, flush_l2);
        const double bytes = double(s.batch) * double(s.L) * double(W) * 2.0;  // the cache, read once
        const std::string shape = "batch " + std::to_string(s.batch) + " H " + std::to_string(s.H) + " L " + std::to_string(s.L) +
                                  " W " + std::to_string(W);
        add("MLA decode attention (bf16 cache)", shape, ms, bytes / (ms * 1e-3) / 1e9, "GB/s");
      }
    }

    {  // 4. Decode GEMV (one row): weight bytes per second from a cold L2, against the copy ceiling of section 1 (the
      // batch-1 step's head is 65.5 MB of small.json's ~345 MB a token).
      struct S { int64_t N, K; const char* name; };
      std::vector<S> shapes = {{32000, 1024, "small.json head"}, {2816, 1024, "small.json gate|up, 8 experts"},
                               {129280, 7168, "DeepSeek-V3 head"}};
      if (quick) shapes.resize(1);
      DeviceBuffer<uint8_t> flush(size_t(256) << 20);
      const auto flush_l2 = [&] { memset_device(flush.get(), 0, flush.size()); };
      for (const S& s : shapes) {
        auto x = random_device<uint16_t>(size_t(s.K), rng, bf);
        auto w = random_device<uint16_t>(size_t(s.N * s.K), rng, bf, 0.02f);
        DeviceBuffer<float> y(static_cast<size_t>(s.N));
        const float ms = median_ms([&] { gemv(DType::BF16, DType::BF16, x.get(), s.K, 1, w.get(), nullptr, y.get(), s.N, s.N, s.K); },
                                   20, 3, flush_l2);
        const std::string shape = std::to_string(s.N) + "x" + std::to_string(s.K) + " " + s.name;
        add("bf16 GEMV (M 1, ours)", shape, ms, double(s.N) * double(s.K) * 2.0 / (ms * 1e-3) / 1e9, "GB/s");
      }
    }

    std::printf("\n| kernel | shape | median ms | rate |\n| --- | --- | ---: | ---: |\n");
    for (const Row& r : rows) std::printf("| %s | %s | %.3f | %.1f %s |\n", r.what.c_str(), r.shape.c_str(), r.ms, r.value, r.unit);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_kernels: %s\n", e.what());
    return 1;
  }
  return 0;
}
