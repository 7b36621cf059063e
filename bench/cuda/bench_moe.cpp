// Routed-expert benchmark: the fused decode MoE (moe_decode) in GB/s of expert weights read, next to the
// device-to-device copy bandwidth measured in the same run; the prefill path (moe_prefill: permutation +
// cuBLASLt per expert) in TFLOP/s next to cuBLASLt on one dense GEMM pair of the same FLOPs; GPU sampling.
// Shapes: small.json (D 1024, I 352, 64 experts, top-6) and DeepSeek-V3 (D 7168, I 2048, 256 experts, top-8).
// Decode timings are CUDA-graph replays of 16 calls with different routings (and, for small, 8 layers' weights
// in turn) so that no call finds its experts in L2; bytes = distinct experts chosen × bytes per expert.
//   build-cuda/bench_cuda_moe [--quick]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/cuda/infer_ops.h"
#include "kernels/cuda/moe_ops.h"

using namespace dsv3;
using namespace dsv3::cuda;

namespace {

float median_ms(const std::function<void()>& f, cudaStream_t s, int reps = 10, int warm = 2) {
  for (int i = 0; i < warm; ++i) f();
  synchronize(s);
  EventTimer t;
  std::vector<float> v;
  for (int i = 0; i < reps; ++i) {
    t.start(s);
    f();
    v.push_back(t.stop_ms(s));
  }
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Row {
  std::string what, shape;
  double ms, value;
  std::string unit, note;
};
std::vector<Row> rows;
void add(std::string what, std::string shape, double ms, double value, std::string unit, std::string note = "") {
  rows.push_back({std::move(what), std::move(shape), ms, value, std::move(unit), std::move(note)});
  const Row& r = rows.back();
  std::printf("  %-30s %-34s %9.4f ms %9.1f %-7s %s\n", r.what.c_str(), r.shape.c_str(), ms, value, r.unit.c_str(), r.note.c_str());
  std::fflush(stdout);
}

// A device pool of random values (bf16 N(0, 0.02) or e4m3 of N(0, 1)); experts are copies of pool slices.
struct Pool {
  DeviceBuffer<uint8_t> buf;
  size_t bytes;
  Pool(size_t n, bool fp8, std::mt19937_64& rng) : buf(n), bytes(n) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<uint8_t> h(n);
    if (fp8) {
      for (auto& b : h) b = f32_to_fp8_e4m3_saturate(nd(rng));
    } else {
      for (size_t i = 0; i + 1 < n; i += 2) {
        const uint16_t v = f32_to_bf16(0.02f * nd(rng));
        std::memcpy(&h[i], &v, 2);
      }
    }
    copy_to_device(buf.get(), h.data(), n);
  }
};

struct Layer {
  std::vector<DeviceBuffer<uint8_t>> mem;
  std::vector<DeviceBuffer<float>> scales;
  MoeExperts view;
};

Layer make_layer(int64_t E, int64_t D, int64_t I, bool fp8, const Pool& pool, std::mt19937_64& rng) {
  Layer L;
  const size_t es = fp8 ? 1 : 2;
  std::vector<const void*> gu, dn;
  std::vector<const float*> gus, dns;
  std::uniform_int_distribution<size_t> off(0, 1 << 20);
  auto fill = [&](size_t bytes) {
    L.mem.emplace_back(bytes);
    size_t done = 0;
    while (done < bytes) {
      const size_t o = (off(rng) * 16) % (pool.bytes / 2), n = std::min(bytes - done, pool.bytes - o);
      copy_on_device(L.mem.back().get() + done, pool.buf.get() + o, n);
      done += n;
    }
    return static_cast<const void*>(L.mem.back().get());
  };
  auto scales = [&](int64_t n) {
    std::vector<float> h(static_cast<size_t>(n));
    std::uniform_real_distribution<float> u(0.5f / 448, 2.0f / 448);
    for (auto& x : h) x = u(rng);
    L.scales.emplace_back(static_cast<size_t>(n));
    copy_to_device(L.scales.back().get(), h.data(), h.size() * 4);
    return static_cast<const float*>(L.scales.back().get());
  };
  for (int64_t e = 0; e < E; ++e) {
    gu.push_back(fill(size_t(2 * I * D) * es));
    dn.push_back(fill(size_t(D * I) * es));
    if (fp8) {
      gus.push_back(scales(2 * ceil_div(I, 128) * ceil_div(D, 128)));
      dns.push_back(scales(ceil_div(D, 128) * ceil_div(I, 128)));
    }
  }
  L.view = MoeExperts(E, D, I, fp8 ? DType::F8_E4M3 : DType::BF16, gu, dn, gus, dns);
  return L;
}

void routing(int64_t M, int64_t k, int64_t E, std::mt19937_64& rng, std::vector<int32_t>& idx, std::vector<float>& w) {
  idx.resize(size_t(M * k));
  w.resize(size_t(M * k));
  std::vector<int32_t> pool(static_cast<size_t>(E));
  std::uniform_real_distribution<float> ud(0.05f, 0.3f);
  for (int64_t m = 0; m < M; ++m) {
    std::iota(pool.begin(), pool.end(), 0);
    for (int64_t j = 0; j < k; ++j) {  // partial Fisher-Yates: k distinct experts
      std::uniform_int_distribution<int64_t> pick(j, E - 1);
      std::swap(pool[size_t(j)], pool[size_t(pick(rng))]);
      idx[size_t(m * k + j)] = pool[size_t(j)];
      w[size_t(m * k + j)] = ud(rng);
    }
  }
}

struct Shape {
  const char* name;
  int64_t E, D, I, k, layers;
};

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  try {
    require_device();
    const DeviceInfo di = device_info();
    std::printf("device: %s, %d SMs, %.1f GiB, L2 %.0f MiB\n", di.name.c_str(), di.sm_count, double(di.total_mem) / (1 << 30),
                double(di.l2_bytes) / (1 << 20));
    Stream stream;
    cudaStream_t s = stream.get();
    std::mt19937_64 rng(2024);
    double copy_gbs = 0;
    {
      const size_t bytes = size_t(2) << 30;
      DeviceBuffer<uint8_t> a(bytes), b(bytes);
      memset_device(a.get(), 1, bytes);
      const float ms = median_ms([&] { copy_on_device(b.get(), a.get(), bytes, s); }, s);
      copy_gbs = 2.0 * double(bytes) / (ms * 1e-3) / 1e9;
      add("d2d copy (read+write)", "2 GiB", ms, copy_gbs, "GB/s");
    }
    const Shape shapes[] = {{"small", 64, 1024, 352, 6, 8}, {"V3", 256, 7168, 2048, 8, 1}};
    const int64_t Ms[] = {1, 4, 16, 64};
    constexpr int kCalls = 16;
    for (const Shape& sh : shapes) {
      for (const bool fp8 : {false, true}) {
        if (quick && fp8) continue;
        Pool pool(size_t(256) << 20, fp8, rng);
        std::vector<Layer> layers;
        for (int64_t l = 0; l < sh.layers; ++l) layers.push_back(make_layer(sh.E, sh.D, sh.I, fp8, pool, rng));
        synchronize();
        const int64_t bpe = layers[0].view.bytes_per_expert();
        for (const int64_t M : Ms) {
          std::vector<DeviceBuffer<int32_t>> didx;
          std::vector<DeviceBuffer<float>> dw;
          double bytes = 0;
          for (int c = 0; c < kCalls; ++c) {
            std::vector<int32_t> idx;
            std::vector<float> w;
            routing(M, sh.k, sh.E, rng, idx, w);
            bytes += double(std::set<int32_t>(idx.begin(), idx.end()).size()) * double(bpe);
            didx.emplace_back(idx.size());
            copy_to_device(didx.back().get(), idx.data(), idx.size() * 4);
            dw.emplace_back(w.size());
            copy_to_device(dw.back().get(), w.data(), w.size() * 4);
          }
          std::vector<float> hx(size_t(M * sh.D));
          std::normal_distribution<float> nd;
          for (auto& v : hx) v = nd(rng);
          DeviceBuffer<float> x(hx.size()), y(hx.size());
          copy_to_device(x.get(), hx.data(), hx.size() * 4);
          memset_device(y.get(), 0, y.bytes());
          const size_t wsb = moe_decode_workspace_bytes(M, sh.k, sh.E, sh.I, 0, sh.D);
          DeviceBuffer<uint8_t> ws(wsb);
          synchronize();
          Graph g;
          g.begin(s);
          for (int c = 0; c < kCalls; ++c)
            moe_decode(layers[size_t(c) % layers.size()].view, x.get(), sh.D, didx[size_t(c)].get(), dw[size_t(c)].get(), M, sh.k,
                       y.get(), sh.D, true, ws.get(), wsb, s);
          g.end(s);
          const float ms = median_ms([&] { g.launch(s); }, s) / kCalls;
          const double gbs = bytes / kCalls / (ms * 1e-3) / 1e9;
          char shape[96], note[64];
          std::snprintf(shape, sizeof shape, "%s %s M %lld", sh.name, fp8 ? "fp8" : "bf16", (long long)M);
          std::snprintf(note, sizeof note, "%.0f%% of copy, %.1f MB/call", 100.0 * gbs / copy_gbs, bytes / kCalls / 1e6);
          add("moe_decode (graph)", shape, ms, gbs, "GB/s", note);
        }
        // Decode batches of 64 tokens as the model runs them: moe_prefill's grouped kernels (graph replays, layers
        // in turn), FP8 both on e4m3 activations and with the weights dequantized to bf16 in the kernel.
        for (const bool fp8_acts : {true, false}) {
          if (!fp8 && !fp8_acts) continue;
          const int64_t M = 64;
          std::vector<DeviceBuffer<int32_t>> didx;
          std::vector<DeviceBuffer<float>> dw;
          double bytes = 0;
          for (int c = 0; c < kCalls; ++c) {
            std::vector<int32_t> idx;
            std::vector<float> w;
            routing(M, sh.k, sh.E, rng, idx, w);
            bytes += double(std::set<int32_t>(idx.begin(), idx.end()).size()) * double(bpe);
            didx.emplace_back(idx.size());
            copy_to_device(didx.back().get(), idx.data(), idx.size() * 4);
            dw.emplace_back(w.size());
            copy_to_device(dw.back().get(), w.data(), w.size() * 4);
          }
          std::vector<float> hx(size_t(M * sh.D));
          std::normal_distribution<float> nd;
          for (auto& v : hx) v = nd(rng);
          DeviceBuffer<float> x(hx.size()), y(hx.size());
          copy_to_device(x.get(), hx.data(), hx.size() * 4);
          const size_t wsb = moe_prefill_workspace_bytes(M, sh.k, sh.E, sh.D, sh.I);
          DeviceBuffer<uint8_t> ws(wsb);
          Gemm gemm;
          synchronize();
          Graph g;
          g.begin(s);
          for (int c = 0; c < kCalls; ++c)
            moe_prefill(gemm, layers[size_t(c) % layers.size()].view, x.get(), sh.D, didx[size_t(c)].get(), dw[size_t(c)].get(), M,
                        sh.k, y.get(), sh.D, false, ws.get(), wsb, s, fp8_acts);
          g.end(s);
          const float ms = median_ms([&] { g.launch(s); }, s) / kCalls;
          const double gbs = bytes / kCalls / (ms * 1e-3) / 1e9;
          char shape[96], note[64];
          std::snprintf(shape, sizeof shape, "%s %s M %lld", sh.name, !fp8 ? "bf16" : fp8_acts ? "fp8 e4m3 acts" : "fp8 bf16 acts",
                        (long long)M);
          std::snprintf(note, sizeof note, "%.0f%% of copy, %.1f MB/call", 100.0 * gbs / copy_gbs, bytes / kCalls / 1e6);
          add("moe grouped (graph)", shape, ms, gbs, "GB/s", note);
        }
        // Prefill: T tokens, balanced random routing.
        const int64_t T = quick ? 1024 : 4096, S = T * sh.k;
        std::vector<int32_t> idx;
        std::vector<float> w;
        routing(T, sh.k, sh.E, rng, idx, w);
        DeviceBuffer<int32_t> didx(idx.size());
        DeviceBuffer<float> dw(w.size());
        copy_to_device(didx.get(), idx.data(), idx.size() * 4);
        copy_to_device(dw.get(), w.data(), w.size() * 4);
        std::vector<float> hx(size_t(T * sh.D));
        std::normal_distribution<float> nd;
        for (auto& v : hx) v = nd(rng);
        DeviceBuffer<float> x(hx.size()), y(hx.size());
        copy_to_device(x.get(), hx.data(), hx.size() * 4);
        const size_t wsb = moe_prefill_workspace_bytes(T, sh.k, sh.E, sh.D, sh.I);
        DeviceBuffer<uint8_t> ws(wsb);
        Gemm gemm;
        const double flops = 6.0 * double(S) * double(sh.D) * double(sh.I);
        for (const bool fp8_acts : {true, false}) {
          if (!fp8 && !fp8_acts) continue;
          const float ms = median_ms(
              [&] {
                moe_prefill(gemm, layers[0].view, x.get(), sh.D, didx.get(), dw.get(), T, sh.k, y.get(), sh.D, false, ws.get(), wsb, s,
                            fp8_acts);
              },
              s, 5, 1);
          char shape[96];
          std::snprintf(shape, sizeof shape, "%s %s T %lld (%lld rows)", sh.name,
                        !fp8 ? "bf16" : fp8_acts ? "fp8 e4m3 acts" : "fp8 bf16 acts", (long long)T, (long long)S);
          add("moe_prefill (grouped kernels)", shape, ms, flops / (ms * 1e-3) / 1e12, "TFLOP/s");
        }
        if (fp8) continue;
        // The dense reference: one GEMM over all S rows for gate|up and one for down (bf16 in, f32 out).
        DeviceBuffer<uint16_t> xa(size_t(S * std::max(sh.D, sh.I)));
        DeviceBuffer<float> ya(size_t(S * std::max(2 * sh.I, sh.D)));
        memset_device(xa.get(), 0x3c, xa.bytes());
        const auto* w0 = layers[0].view.gate_up[0];
        const auto* w1 = layers[0].view.down[0];
        const float msd = median_ms(
            [&] {
              gemm.matmul(DType::BF16, xa.get(), sh.D, w0, sh.D, DType::F32, ya.get(), 2 * sh.I, S, 2 * sh.I, sh.D, s);
              gemm.matmul(DType::BF16, xa.get(), sh.I, w1, sh.I, DType::F32, ya.get(), sh.D, S, sh.D, sh.I, s);
            },
            s, 5, 1);
        char shape[96];
        std::snprintf(shape, sizeof shape, "%s bf16 T %lld (%lld rows)", sh.name, (long long)T, (long long)S);
        add("cuBLASLt dense, same FLOPs", shape, msd, flops / (msd * 1e-3) / 1e12, "TFLOP/s",
            "one expert's weights for all rows");
      }
    }
    // Dense products of decode batches with e4m3 weights (small.json's shapes: q_a | kv_a, q_b, o_proj, shared
    // gate | up, shared down): the grouped kernel as one group, cuBLASLt's block-scaled GEMM after the 1x128
    // activation quantize, and the bf16 weights through cuBLASLt for reference. Weights of 16 layers rotate so
    // that each call reads its weights from HBM rather than L2.
    {
      const std::pair<int64_t, int64_t> nks[] = {{672, 1024}, {1536, 384}, {1024, 1024}, {1408, 1024}, {1024, 704}};
      constexpr int kRot = 16;
      Gemm gemm;
      for (const auto& [N, K] : nks) {
        std::vector<DeviceBuffer<uint8_t>> w8;
        std::vector<DeviceBuffer<uint16_t>> w16;
        std::vector<DeviceBuffer<float>> sc;
        const int64_t nsc = ceil_div(N, int64_t(128)) * ceil_div(K, int64_t(128));
        std::vector<float> hs(static_cast<size_t>(nsc), 1.0f / 64);
        for (int i = 0; i < kRot; ++i) {
          w8.emplace_back(size_t(N * K));
          memset_device(w8.back().get(), 0x38, w8.back().bytes());
          w16.emplace_back(size_t(N * K));
          memset_device(w16.back().get(), 0x3c, w16.back().bytes());
          sc.emplace_back(hs.size());
          copy_to_device(sc.back().get(), hs.data(), hs.size() * 4);
        }
        for (const int64_t M : {int64_t(16), int64_t(64)}) {
          DeviceBuffer<uint16_t> x(size_t(M * K));
          memset_device(x.get(), 0x3c, x.bytes());
          DeviceBuffer<float> y(size_t(M * N));
          char shape[64];
          std::snprintf(shape, sizeof shape, "M %lld N %lld K %lld", (long long)M, (long long)N, (long long)K);
          // kRot back-to-back calls per timing (the weights of each from HBM), per call
          const float a = median_ms([&] { for (int i = 0; i < kRot; ++i) rows_gemm(DType::F8_E4M3, x.get(), K, M, w8[size_t(i)].get(), sc[size_t(i)].get(), N, K, y.get(), N, s); }, s) / kRot;
          add("rows_gemm fp8", shape, a, double(N * K) / (a * 1e-3) / 1e9, "GB/s", "e4m3 weight bytes");
          DeviceBuffer<uint8_t> xq(size_t(M * K));
          DeviceBuffer<float> xs(size_t(fp8_act_scale_count(M, K)));
          const float a8 = median_ms([&] {
            for (int i = 0; i < kRot; ++i) {
              quantize_fp8_1x128(DType::BF16, x.get(), K, M, K, xq.get(), xs.get(), s);
              rows_gemm_fp8(xq.get(), xs.get(), M, w8[size_t(i)].get(), sc[size_t(i)].get(), N, K, y.get(), N, s);
            }
          }, s) / kRot;
          add("rows_gemm_fp8 e4m3 acts (+ quantize)", shape, a8, double(N * K) / (a8 * 1e-3) / 1e9, "GB/s", "e4m3 weight bytes");
          const float a2 = median_ms([&] { for (int i = 0; i < kRot; ++i) rows_gemm(DType::BF16, x.get(), K, M, w16[size_t(i)].get(), nullptr, N, K, y.get(), N, s); }, s) / kRot;
          add("rows_gemm bf16", shape, a2, double(2 * N * K) / (a2 * 1e-3) / 1e9, "GB/s", "bf16 weight bytes");
          const float b = median_ms([&] { for (int i = 0; i < kRot; ++i) gemm.linear_fp8(DType::BF16, x.get(), K, w8[size_t(i)].get(), sc[size_t(i)].get(), DType::F32, y.get(), N, M, N, K, s); }, s) / kRot;
          add("cuBLASLt block-scaled FP8 (+ quantize)", shape, b, double(N * K) / (b * 1e-3) / 1e9, "GB/s", "e4m3 weight bytes");
          const float c = median_ms([&] { for (int i = 0; i < kRot; ++i) gemm.matmul(DType::BF16, x.get(), K, w16[size_t(i)].get(), K, DType::F32, y.get(), N, M, N, K, s); }, s) / kRot;
          add("cuBLASLt bf16", shape, c, double(2 * N * K) / (c * 1e-3) / 1e9, "GB/s", "bf16 weight bytes");
        }
      }
    }
    // Sampling.
    for (const int64_t V : {int64_t(32000), int64_t(129280)}) {
      for (const int64_t B : {int64_t(1), int64_t(64)}) {
        std::vector<float> hl(size_t(B * V));
        std::normal_distribution<float> nd(0.0f, 2.0f);
        for (auto& v : hl) v = nd(rng);
        DeviceBuffer<float> l(hl.size());
        copy_to_device(l.get(), hl.data(), hl.size() * 4);
        std::vector<uint64_t> st(size_t(2 * B), 1);
        DeviceBuffer<uint64_t> r(st.size());
        copy_to_device(r.get(), st.data(), st.size() * 8);
        DeviceBuffer<int32_t> out(static_cast<size_t>(B));
        DeviceBuffer<uint8_t> ws(sample_workspace_bytes(B, V));
        const GpuSampling p{0.8f, 50, 0.9f, 0.0f};
        const float ms = median_ms([&] { sample_rows(l.get(), V, B, V, p, r.get(), true, out.get(), ws.get(), ws.bytes(), s); }, s);
        char shape[64];
        std::snprintf(shape, sizeof shape, "B %lld V %lld T .8 k 50 p .9", (long long)B, (long long)V);
        add("sample_rows", shape, ms, double(B) / (ms * 1e-3), "rows/s");
      }
    }
    std::printf("\n| kernel | shape | median ms | rate | unit | note |\n| --- | --- | ---: | ---: | --- | --- |\n");
    for (const Row& r : rows)
      std::printf("| %s | %s | %.4f | %.1f | %s | %s |\n", r.what.c_str(), r.shape.c_str(), r.ms, r.value, r.unit.c_str(), r.note.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_moe: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
