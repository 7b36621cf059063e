// --device cpu|cuda and --dtype bf16|fp32 for the commands that run the model (forward, generate, chat).
#pragma once
#include <CLI/CLI.hpp>
#include <memory>
#include <string>

#include "infer/step_model.h"
#include "model/transformer.h"

namespace dsv3::cli {

struct DeviceArgs {
  std::string device = "cpu";  // cpu | cuda
  std::string dtype = "bf16";  // GPU compute dtype: bf16 | fp32 (TF32 off); the CPU always computes in f32
};
void add_device_options(CLI::App* sub, DeviceArgs& a);

// A checkpoint loaded for one device: the host model (always; mmap'd weights) and, with --device cuda, its
// copy on the GPU. Errors: "no CUDA GPU available: ..." (no GPU, or a build without CUDA), out of memory.
class LoadedModel {
 public:
  static LoadedModel load(const std::string& dir, const DeviceArgs& a);
  const Transformer& host() const { return *host_; }
  const ModelConfig& config() const { return host_->config(); }
  const StepModel& stepper() const { return *step_; }
  ForwardResult forward(const Tensor& ids, const ForwardOptions& o) const;
  bool on_gpu() const { return gpu_ != nullptr; }

 private:
  std::unique_ptr<Transformer> host_;
  std::unique_ptr<StepModel> step_;
  const StepModel* gpu_ = nullptr;  // the CudaModel inside step_, when on the GPU
};

}  // namespace dsv3::cli
