// Device discovery, memory, copies and the error helper.
#include <cstring>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_ops.h"

namespace dsv3::cuda {

void throw_cuda_error(const char* api, const char* file, int line, const std::string& what) {
  std::string name(api);
  if (const size_t p = name.find('('); p != std::string::npos) name.resize(p);
  while (!name.empty() && name.back() == ' ') name.pop_back();
  const char* base = std::strrchr(file, '/');
  throw Error(fmt::format("CUDA error at {}:{}: {} failed: {}", base ? base + 1 : file, line, name, what));
}

namespace {
struct Probe {
  int count = 0;
  std::string reason;
  Probe() {
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
      count = 0;
      reason = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
      (void)cudaGetLastError();
    } else if (count == 0) {
      reason = "the CUDA runtime reports no devices";
    }
  }
};
const Probe& probe() {
  static const Probe p;
  return p;
}
}  // namespace

int device_count() { return probe().count; }
std::string no_device_reason() { return probe().reason; }
void require_device() {
  if (device_count() == 0) fail("no CUDA GPU available: {}", no_device_reason());
}

DeviceInfo device_info(int device) {
  require_device();
  cudaDeviceProp p{};
  DSV3_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  DeviceInfo d;
  d.name = p.name;
  d.cc_major = p.major;
  d.cc_minor = p.minor;
  d.sm_count = p.multiProcessorCount;
  d.total_mem = p.totalGlobalMem;
  d.l2_bytes = size_t(p.l2CacheSize);
  d.smem_optin = p.sharedMemPerBlockOptin;
  return d;
}

void* device_malloc(size_t bytes) {
  require_device();
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    fail("CUDA error: cudaMalloc of {} bytes failed: {}", bytes, cudaGetErrorString(e));
  }
  return p;
}
void device_free(void* p) noexcept {
  if (p) (void)cudaFree(p);
}
void* host_pinned_alloc(size_t bytes) {
  require_device();
  void* p = nullptr;
  const cudaError_t e = cudaMallocHost(&p, bytes);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    fail("CUDA error: cudaMallocHost of {} bytes failed: {}", bytes, cudaGetErrorString(e));
  }
  return p;
}
void host_pinned_free(void* p) noexcept {
  if (p) (void)cudaFreeHost(p);
}
void* host_pinned_device_pointer(void* p) {
  void* d = nullptr;
  DSV3_CUDA_CHECK(cudaHostGetDevicePointer(&d, p, 0));
  return d;
}
void copy_to_device(void* dst, const void* src, size_t bytes, cudaStream_t s) {
  DSV3_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s));
  if (!s) DSV3_CUDA_CHECK(cudaStreamSynchronize(s));
}
void copy_to_host(void* dst, const void* src, size_t bytes, cudaStream_t s) {
  DSV3_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s));
  if (!s) DSV3_CUDA_CHECK(cudaStreamSynchronize(s));
}
void copy_on_device(void* dst, const void* src, size_t bytes, cudaStream_t s) {
  DSV3_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s));
}
void memset_device(void* dst, int value, size_t bytes, cudaStream_t s) { DSV3_CUDA_CHECK(cudaMemsetAsync(dst, value, bytes, s)); }
void synchronize(cudaStream_t s) {
  DSV3_CUDA_CHECK(cudaStreamSynchronize(s));
  DSV3_CUDA_CHECK(cudaGetLastError());
}

EventTimer::EventTimer() {
  require_device();
  cudaEvent_t a = nullptr, b = nullptr;
  DSV3_CUDA_CHECK(cudaEventCreate(&a));
  DSV3_CUDA_CHECK(cudaEventCreate(&b));
  begin_ = a;
  end_ = b;
}
EventTimer::~EventTimer() {
  if (begin_) (void)cudaEventDestroy(static_cast<cudaEvent_t>(begin_));
  if (end_) (void)cudaEventDestroy(static_cast<cudaEvent_t>(end_));
}
void EventTimer::start(cudaStream_t s) { DSV3_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(begin_), s)); }
float EventTimer::stop_ms(cudaStream_t s) {
  DSV3_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(end_), s));
  DSV3_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(end_)));
  DSV3_CUDA_CHECK(cudaGetLastError());
  float ms = 0.0f;
  DSV3_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(begin_), static_cast<cudaEvent_t>(end_)));
  return ms;
}

Event::~Event() {
  if (e_) (void)cudaEventDestroy(static_cast<cudaEvent_t>(e_));
}
void Event::record(cudaStream_t s) {
  if (!e_) {
    cudaEvent_t e = nullptr;
    DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    e_ = e;
  }
  DSV3_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(e_), s));
  recorded_ = true;
}
void Event::wait() const {
  if (recorded_) DSV3_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(e_)));
}

}  // namespace dsv3::cuda
