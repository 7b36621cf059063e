// Error checking for the CUDA sources (needs the CUDA headers; included by the .cu files only).
// cuda_check turns a CUDA runtime or cuBLASLt status into dsv3::Error with one line:
//   "CUDA error at gemm.cu:123: cublasLtMatmul failed: CUBLAS_STATUS_NOT_SUPPORTED"
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>

#include "core/error.h"

namespace dsv3::cuda {

[[noreturn]] void throw_cuda_error(const char* api, const char* file, int line, const std::string& what);

inline void cuda_check(cudaError_t e, const char* api, const char* file, int line) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error state so later calls are not blamed
    throw_cuda_error(api, file, line, std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")");
  }
}
inline void cuda_check(cublasStatus_t s, const char* api, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS) throw_cuda_error(api, file, line, std::string(cublasLtGetStatusName(s)) + " (" + cublasLtGetStatusString(s) + ")");
}

}  // namespace dsv3::cuda

// The API name is the expression up to its first '(' (see throw_cuda_error).
#define DSV3_CUDA_CHECK(expr) ::dsv3::cuda::cuda_check((expr), #expr, __FILE__, __LINE__)
// After a kernel launch: launch-configuration errors now, asynchronous faults at the next synchronize().
#define DSV3_CUDA_CHECK_LAUNCH(name) ::dsv3::cuda::cuda_check(cudaGetLastError(), name, __FILE__, __LINE__)
