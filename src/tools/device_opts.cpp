#include "tools/device_opts.h"

#ifdef DSV3_HAVE_CUDA
#include "infer/cuda_model.h"
#endif

namespace dsv3::cli {

void add_device_options(CLI::App* sub, DeviceArgs& a) {
  sub->add_option("--device", a.device, "Where the model runs: cpu or cuda (one GPU)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  sub->add_option("--dtype", a.dtype, "GPU compute dtype: bf16, or fp32 (exact f32 GEMMs, TF32 off)")
      ->check(CLI::IsMember({"bf16", "fp32"}))
      ->capture_default_str();
  sub->add_option("--fp8-dense", a.fp8_dense,
                  "FP8 checkpoints on the GPU, the projections outside the routed experts: bf16 (dequantized at load; "
                  "fastest for batches), fp8 (as stored: half their memory, fastest at batch 1), auto (fp8 for one "
                  "sequence, else bf16)")
      ->check(CLI::IsMember({"auto", "bf16", "fp8"}))
      ->capture_default_str();
}

LoadedModel LoadedModel::load(const std::string& dir, const DeviceArgs& a, [[maybe_unused]] bool one_sequence) {
  LoadedModel m;
#ifndef DSV3_HAVE_CUDA
  DSV3_CHECK(a.device != "cuda", "no CUDA GPU available: this dsv3 was built without CUDA (no nvcc at configure time)");
#endif
  m.host_ = Transformer::load(dir);
  if (a.device == "cuda") {
#ifdef DSV3_HAVE_CUDA
    CudaModelOptions o;
    o.dtype = a.dtype == "fp32" ? DType::F32 : DType::BF16;
    o.fp8_dense_native = a.fp8_dense == "fp8" || (a.fp8_dense == "auto" && one_sequence);
    o.verbose = true;
    m.step_ = CudaModel::load(*m.host_, o);
    m.gpu_ = m.step_.get();
#endif
  } else {
    m.step_ = std::make_unique<CpuStepModel>(*m.host_);
  }
  return m;
}

ForwardResult LoadedModel::forward(const Tensor& ids, const ForwardOptions& o) const {
#ifdef DSV3_HAVE_CUDA
  if (gpu_) return static_cast<const CudaModel*>(gpu_)->forward(ids, o);
#endif
  return host_->forward(ids, o);
}

}  // namespace dsv3::cli
