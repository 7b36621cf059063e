// --device cpu|cuda, --dtype bf16|fp32 and --fp8-dense for the commands that run the model (forward, generate, chat).
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
  // FP8 checkpoints on the GPU, the projections outside the routed experts: bf16 (dequantized at load), fp8 (as
  // stored), or auto: fp8 for a run of one sequence (its decode steps: the persistent kernel's e4m3 variant), bf16
  // for batches (CudaModelOptions::fp8_dense_native).
  std::string fp8_dense = "auto";
};
void add_device_options(CLI::App* sub, DeviceArgs& a);

// A checkpoint loaded for one device: the host model (always; mmap'd weights) and, with --device cuda, its
// copy on the GPU. Errors: "no CUDA GPU available: ..." (no GPU, or a build without CUDA), out of memory.
class LoadedModel {
 public:
  // one_sequence: the run decodes a single sequence (chat, one prompt), for --fp8-dense auto.
  static LoadedModel load(const std::string& dir, const DeviceArgs& a, bool one_sequence = false);
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
