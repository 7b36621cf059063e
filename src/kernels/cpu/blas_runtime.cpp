// OpenBLAS picks its kernels by CPU model at load time. Debian's 0.3.21 does not know some current Xeons
// (e.g. the virtual CPUs this project's CI runs on) and falls back to its SSE3 "Prescott" kernels, a 4x
// slower sgemm (measured: 32 vs 134 GFLOP/s on 2 cores). The choice is made in the library's constructor,
// before any of our code runs, from OPENBLAS_CORETYPE. So when detection failed on a CPU that has AVX-512
// (or AVX2), we set OPENBLAS_CORETYPE and re-execute the program once, with the same arguments, from an
// ELF constructor (glibc passes it argc/argv). OPENBLAS_CORETYPE set by the user is always respected.
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/ops.h"

extern "C" char* openblas_get_corename(void);

namespace dsv3::ops {

std::string blas_core() { return openblas_get_corename(); }

namespace {
__attribute__((constructor)) void fix_blas_core(int, char** argv, char**) {
  if (std::getenv("OPENBLAS_CORETYPE") || !argv || !argv[0]) return;
  if (std::strcmp(openblas_get_corename(), "Prescott") != 0) return;
  const char* core = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? "SkylakeX"
                     : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")    ? "Haswell"
                                                                                         : nullptr;
  if (!core) return;
  setenv("OPENBLAS_CORETYPE", core, 1);
  execv("/proc/self/exe", argv);  // returns only on failure: carry on with the slow kernels
}
}  // namespace

}  // namespace dsv3::ops
