// End-to-end GPU inference benchmark of the CUDA model on a random-weight checkpoint:
//   bench_cuda_decode --config CONFIG.json [--dir DIR] [--fp8] [--dtype bf16|fp32] [--tokens N] [--batch B]
//                     [--prefill T] [--context C] [--no-graphs] [--host-sampling] [--only batch|prefill]
// Writes the checkpoint to DIR first when DIR has none (dsv3::write_random_checkpoint). Prints one table:
// the device-to-device copy bandwidth measured in the same run, batch-1 decode tokens/s next to its bound
// (bytes of weights one decode step reads ÷ that bandwidth), batch-B decode throughput (greedy, the next ids drawn
// on the GPU as the Generator does; --host-sampling copies every step's logits out instead), and prefill of T tokens
// (the Generator's cached prefill, and the uncached forward without copying its logits to the host).
// --only batch / --only prefill runs just the batch-B decode / the prefill (one profile per stage under ncu).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "infer/cuda_model.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/persistent_ops.h"
#include "model/init.h"
#include "model/stats.h"

using namespace dsv3;

namespace {
using clk = std::chrono::steady_clock;
double since(clk::time_point t) { return std::chrono::duration<double>(clk::now() - t).count(); }

double copy_bandwidth() {
  const size_t bytes = size_t(1) << 30;
  cuda::DeviceBuffer<uint8_t> a(bytes), b(bytes);
  cuda::memset_device(a.get(), 1, bytes);
  cuda::EventTimer t;
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    t.start();
    cuda::copy_on_device(b.get(), a.get(), bytes);
    ms.push_back(t.stop_ms());
  }
  std::sort(ms.begin(), ms.end());
  return 2.0 * double(bytes) / (double(ms[ms.size() / 2]) * 1e-3);  // read + write
}

// cuBLASLt bf16 GEMM rate (f32 out) on y[M,N] = x[M,K]·W[N,K]ᵀ, FLOP/s, median of 10 event-timed runs.
double gemm_rate(int64_t M, int64_t N, int64_t K) {
  cuda::DeviceBuffer<uint16_t> x(size_t(M * K)), w(size_t(N * K));
  cuda::DeviceBuffer<float> y(size_t(M * N));
  cuda::memset_device(x.get(), 0x3c, x.bytes());
  cuda::memset_device(w.get(), 0x3c, w.bytes());
  cuda::Gemm g;
  cuda::EventTimer t;
  std::vector<float> ms;
  for (int i = 0; i < 13; ++i) {
    t.start();
    g.matmul(DType::BF16, x.get(), K, w.get(), K, DType::F32, y.get(), N, M, N, K);
    const float v = t.stop_ms();
    if (i >= 3) ms.push_back(v);
  }
  std::sort(ms.begin(), ms.end());
  return 2.0 * double(M) * double(N) * double(K) / (double(ms[ms.size() / 2]) * 1e-3);
}

// cuBLASLt block-scaled FP8 GEMM rate (1x128 activation and 128x128 weight scales, bf16 out), FLOP/s, median of
// 10 event-timed runs; the ceiling an FP8 prefill could reach.
double gemm_fp8_rate(int64_t M, int64_t N, int64_t K) {
  cuda::DeviceBuffer<uint8_t> x(size_t(M * K)), w(size_t(N * K));
  cuda::DeviceBuffer<uint16_t> y(size_t(M * N));
  cuda::memset_device(x.get(), 0x38, x.bytes());  // e4m3 1.0
  cuda::memset_device(w.get(), 0x38, w.bytes());
  const std::vector<float> xs_h(size_t(cuda::fp8_act_scale_count(M, K)), 1.0f);
  const std::vector<float> ws_h(size_t(cuda::ceil_div(N, 128) * cuda::ceil_div(K, 128)), 1.0f);
  cuda::DeviceBuffer<float> xs(xs_h.size()), ws(ws_h.size());
  cuda::copy_to_device(xs.get(), xs_h.data(), xs.bytes());
  cuda::copy_to_device(ws.get(), ws_h.data(), ws.bytes());
  cuda::Gemm g;
  cuda::EventTimer t;
  std::vector<float> ms;
  for (int i = 0; i < 13; ++i) {
    t.start();
    g.matmul_fp8(x.get(), xs.get(), w.get(), ws.get(), DType::BF16, y.get(), N, M, N, K);
    const float v = t.stop_ms();
    if (i >= 3) ms.push_back(v);
  }
  std::sort(ms.begin(), ms.end());
  return 2.0 * double(M) * double(N) * double(K) / (double(ms[ms.size() / 2]) * 1e-3);
}

// The prefill pass's own GEMMs on cuBLASLt (bf16, f32 out), each shape timed once: the dense projections of every
// layer (q_a|kv_a, q_b, kv_b, o_proj; the dense MLPs; the shared experts and the router of MoE layers) and the routed
// experts as E GEMMs of T·k/E rows each (a perfectly balanced routing). Returns the seconds; *flop gets their FLOPs.
// Attention's T² products and the glue are not in it: a ceiling for the GEMM part at these shapes, against which
// the 8192³ rate (the yardstick) can be read.
double prefill_gemm_seconds(const ModelConfig& c, int64_t T, double* flop) {
  struct Shape {
    int64_t M, N, K, count;
  };
  const int64_t D = c.hidden_size, H = c.num_attention_heads, dqk = c.qk_nope_head_dim + c.qk_rope_head_dim;
  const int64_t nq = c.q_lora_rank, kvr = c.kv_lora_rank, L = c.num_hidden_layers;
  int64_t moe = 0;
  for (int64_t l = 0; l < L; ++l) moe += c.is_moe_layer(l) ? 1 : 0;
  const int64_t dense = L - moe, I = c.moe_intermediate_size, E = c.n_routed_experts;
  const int64_t rows = std::max<int64_t>(1, T * c.num_experts_per_tok / std::max<int64_t>(E, 1));
  std::vector<Shape> sh = {
      {T, (nq > 0 ? nq : H * dqk) + kvr + c.qk_rope_head_dim, D, L},
      {T, H * (c.qk_nope_head_dim + c.v_head_dim), kvr, L},
      {T, D, H * c.v_head_dim, L},
  };
  if (nq > 0) sh.push_back({T, H * dqk, nq, L});
  if (dense > 0) sh.push_back({T, 2 * c.intermediate_size, D, dense}), sh.push_back({T, D, c.intermediate_size, dense});
  if (moe > 0) {
    if (c.n_shared_experts > 0)
      sh.push_back({T, 2 * c.n_shared_experts * I, D, moe}), sh.push_back({T, D, c.n_shared_experts * I, moe});
    sh.push_back({T, E, D, moe});
    sh.push_back({rows, 2 * I, D, moe * E}), sh.push_back({rows, D, I, moe * E});
  }
  double sec = 0, f = 0;
  for (const Shape& q : sh) {
    const double fl = 2.0 * double(q.M) * double(q.N) * double(q.K);
    sec += double(q.count) * fl / gemm_rate(q.M, q.N, q.K);
    f += double(q.count) * fl;
  }
  *flop = f;
  return sec;
}

bool g_host_sampling = false;  // --host-sampling

int64_t argmax(const float* x, int64_t V) { return int64_t(std::max_element(x, x + V) - x); }

// Decode `steps` tokens for B sequences after a prompt of P tokens each; returns tokens/s of the decode part.
// *graph_ms (when given): GPU time of one replay of the step's CUDA graph alone, timed while the cache lives.
double decode_rate(const CudaModel& m, int64_t B, int64_t P, int64_t steps, int64_t* graph_replays, double* graph_ms = nullptr) {
  const int64_t V = m.config().vocab_size;
  auto cache = m.make_cache(B, P + steps + 1);
  std::vector<int64_t> toks;
  std::vector<Batch::Seq> seqs;
  for (int64_t b = 0; b < B; ++b) {
    seqs.push_back({b, 0, P});
    for (int64_t i = 0; i < P; ++i) toks.push_back((b * 131 + i * 7 + 3) % V);
  }
  // Greedy, as the Generator runs it: drawn on the GPU (only the ids come back), or with --host-sampling every
  // step's logits copied out and the argmax taken here.
  const SamplingParams greedy;
  std::vector<int64_t> last(static_cast<size_t>(B));
  auto next = [&](const std::vector<int64_t>& t, int64_t s) {
    if (!g_host_sampling) {
      last = m.step_sampled(t, Batch::cached(seqs), *cache, greedy, std::vector<uint64_t>(size_t(B), uint64_t(s)));
      return;
    }
    const auto st = m.step(t, Batch::cached(seqs), *cache);
    for (int64_t b = 0; b < B; ++b) last[size_t(b)] = argmax(st.logits.f32() + b * V, V);
  };
  next(toks, 0);
  const int64_t warm = 3;
  const int64_t r0 = m.graph_replays();
  clk::time_point t0;
  for (int64_t s = 0; s < steps; ++s) {
    if (s == warm) t0 = clk::now();
    seqs.clear();
    for (int64_t b = 0; b < B; ++b) seqs.push_back({b, P + s, 1});
    next(std::vector<int64_t>(last), s + 1);
  }
  *graph_replays = m.graph_replays() - r0;
  const double rate = double(B * (steps - warm)) / since(t0);
  if (graph_ms) *graph_ms = m.time_last_graph_ms(50);
  if (B == 1) cuda::decode_persistent_trace_report();  // DSV3_PERSISTENT_TRACE=1 only
  return rate;
}
}  // namespace

int main(int argc, char** argv) {
  std::string config, dir = "/tmp/dsv3-bench-ckpt", dtype = "bf16";
  bool fp8 = false, graphs = true;
  int64_t tokens = 256, batch = 64, prefill = 4096, context = 64;
  std::string only;  // "", "batch" or "prefill"
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--config") config = next();
    else if (a == "--dir") dir = next();
    else if (a == "--fp8") fp8 = true;
    else if (a == "--dtype") dtype = next();
    else if (a == "--tokens") tokens = std::stoll(next());
    else if (a == "--batch") batch = std::stoll(next());
    else if (a == "--prefill") prefill = std::stoll(next());
    else if (a == "--context") context = std::stoll(next());
    else if (a == "--no-graphs") graphs = false;
    else if (a == "--host-sampling") g_host_sampling = true;
    else if (a == "--only") only = next();
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  try {
    if (!std::filesystem::exists(std::filesystem::path(dir) / "config.json")) {
      if (config.empty()) throw Error("--config is needed to write a random checkpoint into " + dir);
      const auto t0 = clk::now();
      InitOptions o;
      o.fp8 = fp8;
      o.seed = 1;
      ModelConfig c = ModelConfig::load(config);
      if (fp8) c.quant.fp8 = true;
      write_random_checkpoint(c, dir, o);
      std::fprintf(stderr, "wrote a random checkpoint to %s in %.1f s\n", dir.c_str(), since(t0));
    }
    auto host = Transformer::load(dir);
    CudaModelOptions o;
    o.dtype = dtype == "fp32" ? DType::F32 : DType::BF16;
    o.graphs = graphs;
    o.verbose = true;
    auto m = CudaModel::load(*host, o);
    const cuda::DeviceInfo d = cuda::device_info();
    const double bw = copy_bandwidth();
    const double bytes = double(m->decode_bytes_per_token());
    const double bound = bw / bytes;
    int64_t rep1 = 0, repB = 0;
    double g1 = -1, gB = -1;  // the decode graphs alone (no host work)
    if (!only.empty() && only != "batch" && only != "prefill") throw Error("--only: expected batch or prefill, got '" + only + "'");
    if (only == "batch") {
      const double rB = decode_rate(*m, batch, context, std::min<int64_t>(tokens, 64), &repB, &gB);
      std::printf("| batch-%lld decode (%lld graph replays) | %.1f tokens/s (%.3f ms/step; its CUDA graph alone %.3f ms) |\n",
                  (long long)batch, (long long)repB, rB, 1e3 * double(batch) / rB, gB);
      return 0;
    }
    const double r1 = only.empty() ? decode_rate(*m, 1, context, tokens, &rep1, &g1) : 0.0;
    const double rB = batch > 1 && only.empty() ? decode_rate(*m, batch, context, std::min<int64_t>(tokens, 64), &repB, &gB) : 0.0;

    // Prefill: the Generator's cached prefill of one prompt (last row's logits only), then the uncached forward.
    const int64_t V = m->config().vocab_size;
    std::vector<int64_t> prompt(static_cast<size_t>(prefill));
    for (int64_t i = 0; i < prefill; ++i) prompt[size_t(i)] = (i * 7919 + 11) % V;
    // The Generator's prefill (step_sampled: the first token drawn on the GPU, its id back) and the step that also
    // returns every row's hidden state (the speculative path's: 16 MB of f32 at T 4096 to pageable host memory).
    double pre = 0, pre_h = 0, fwd = 0;
    const SamplingParams greedy;
    for (int rep = 0; rep < 6; ++rep) {
      auto cache = m->make_cache(1, prefill);
      const auto t0 = clk::now();
      if (rep % 2 == 0) m->step_sampled(prompt, Batch::cached({{0, 0, prefill}}), *cache, greedy, {0});
      else m->step(prompt, Batch::cached({{0, 0, prefill}}), *cache);
      const double t = since(t0);
      double& best = rep % 2 == 0 ? pre : pre_h;
      if (rep > 1) best = best == 0 ? t : std::min(best, t);
    }
    if (only == "prefill") {
      std::printf("| prefill T=%lld, cached step (generator path: first token sampled on the GPU) | %.1f tokens/s (%.1f ms) |\n",
                  (long long)prefill, double(prefill) / pre, pre * 1e3);
      std::printf("| prefill T=%lld, cached step returning the hidden states (speculative path) | %.1f tokens/s (%.1f ms) |\n",
                  (long long)prefill, double(prefill) / pre_h, pre_h * 1e3);
      // The same steps with events around their kernels (an extra synchronisation, so not the row above): how much
      // of a step's wall time the GPU spends between its first and last kernel.
      m->time_steps(true);
      double gpu = 0, wall = 0;
      for (int rep = 0; rep < 3; ++rep) {
        auto cache = m->make_cache(1, prefill);
        const auto t0 = clk::now();
        m->step_sampled(prompt, Batch::cached({{0, 0, prefill}}), *cache, greedy, {0});
        const double t = since(t0), g = m->last_step_gpu_ms() * 1e-3;
        if (rep > 0 && (wall == 0 || t < wall)) wall = t, gpu = g;
      }
      m->time_steps(false);
      std::printf("| prefill T=%lld, GPU span of the step's kernels (events) | %.2f ms of its %.2f ms wall time (%.1f%%) |\n",
                  (long long)prefill, gpu * 1e3, wall * 1e3, 100.0 * gpu / wall);
      return 0;
    }
    for (int rep = 0; rep < 2; ++rep) {
      ForwardOptions fo;
      fo.mtp_depth = 0;
      const auto t0 = clk::now();
      m->forward(Tensor::from_vector(prompt, {1, prefill}), fo);
      const double t = since(t0);
      if (rep > 0) fwd = t;
    }
    const double flops_tok = model_stats(m->config()).forward_flops_per_token(prefill);
    const double g_big = gemm_rate(8192, 8192, 8192), g_model = gemm_rate(prefill, m->config().hidden_size * 4,
                                                                            m->config().hidden_size);
    std::printf("device: %s | weights %.3f GiB (%s%s) | decode reads %.1f MB/token\n", d.name.c_str(),
                double(m->weight_bytes()) / double(1ull << 30), dtype.c_str(), fp8 ? ", fp8 checkpoint" : "", bytes / 1e6);
    std::printf("| what | value |\n| --- | ---: |\n");
    std::printf("| d2d copy bandwidth (read+write) | %.1f GB/s |\n", bw / 1e9);
    std::printf("| batch-1 decode bound (copy bw / bytes per token) | %.0f tokens/s |\n", bound);
    std::printf("| batch-1 decode (context %lld, %lld tokens, %lld graph replays) | %.1f tokens/s (%.1f%% of bound, %.3f ms/token) |\n",
                (long long)context, (long long)tokens, (long long)rep1, r1, 100.0 * r1 / bound, 1e3 / r1);
    if (g1 > 0)
      std::printf("| batch-1 decode step, GPU time of its CUDA graph alone | %.3f ms (%.1f%% of the bound's %.3f ms) |\n", g1,
                  100.0 * (1e3 / bound) / g1, 1e3 / bound);
    if (batch > 1)
      std::printf("| batch-%lld decode (%lld graph replays) | %.1f tokens/s (%.3f ms/step; its CUDA graph alone %.3f ms) |\n",
                  (long long)batch, (long long)repB, rB, 1e3 * double(batch) / rB, gB);
    std::printf("| cuBLASLt bf16 GEMM 8192^3 / %lldx%lldx%lld | %.1f / %.1f TFLOP/s |\n", (long long)prefill,
                (long long)m->config().hidden_size * 4, (long long)m->config().hidden_size, g_big / 1e12, g_model / 1e12);
    std::printf("| cuBLASLt block-scaled FP8 GEMM 8192^3 (bf16 out) | %.1f TFLOP/s |\n", gemm_fp8_rate(8192, 8192, 8192) / 1e12);
    std::printf("| prefill T=%lld, cached step (generator path: first token sampled on the GPU) | %.1f tokens/s (%.1f ms, %.1f TFLOP/s = %.1f%% of 8192^3 GEMM) |\n",
                (long long)prefill, double(prefill) / pre, pre * 1e3, flops_tok * double(prefill) / pre / 1e12,
                100.0 * flops_tok * double(prefill) / pre / g_big);
    std::printf("| prefill T=%lld, cached step returning the hidden states (speculative path) | %.1f tokens/s (%.1f ms) |\n",
                (long long)prefill, double(prefill) / pre_h, pre_h * 1e3);
    std::printf("| prefill T=%lld, uncached forward incl. logits to host | %.1f tokens/s (%.1f ms) |\n", (long long)prefill,
                double(prefill) / fwd, fwd * 1e3);
    double gemm_flop = 0;
    const double gemm_sec = prefill_gemm_seconds(m->config(), prefill, &gemm_flop);
    std::printf("| the prefill's GEMMs alone on cuBLASLt at their shapes (balanced routing, no attention) | %.2f ms, %.1f TFLOP/s "
                "(%.1f%% of 8192^3 GEMM) |\n",
                gemm_sec * 1e3, gemm_flop / gemm_sec / 1e12, 100.0 * gemm_flop / gemm_sec / g_big);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
