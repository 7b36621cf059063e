// Device discovery, memory and error reporting.
#include <string>

#include "cuda_test_util.h"

namespace dsv3::cuda {
namespace {
using namespace test;

TEST(CudaDevice, NoGpuGivesAClearError) {
  if (device_count() > 0) GTEST_SKIP() << "a GPU is present (run with CUDA_VISIBLE_DEVICES= to exercise this)";
  try {
    require_device();
    FAIL() << "require_device did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no CUDA GPU available"), std::string::npos) << e.what();
  }
  EXPECT_THROW(DeviceBuffer<float>(16), Error);
  EXPECT_THROW(Gemm(), Error);
}

TEST(CudaDevice, InfoAndRoundTrip) {
  DSV3_REQUIRE_GPU();
  const DeviceInfo d = device_info();
  EXPECT_GT(d.sm_count, 0);
  EXPECT_GT(d.total_mem, size_t(0));
  std::printf("device: %s, sm_%d%d, %d SMs, %.1f GiB, L2 %.0f MB\n", d.name.c_str(), d.cc_major, d.cc_minor, d.sm_count,
              double(d.total_mem) / (1 << 30), double(d.l2_bytes) / 1e6);
  std::mt19937_64 rng(1);
  const std::vector<float> h = randn(12345, rng);
  DeviceBuffer<float> a = upload(h), b(h.size());
  copy_on_device(b.get(), a.get(), a.bytes());
  EXPECT_EQ(download(b), h);
}

TEST(CudaDevice, ErrorsAreOneLineWithFileApiAndReason) {
  DSV3_REQUIRE_GPU();
  DeviceBuffer<float> a(16);
  // An invalid device ordinal: the runtime refuses it synchronously (no sticky error).
  try {
    (void)device_info(9999);
    FAIL() << "an invalid device ordinal did not throw";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("CUDA error at device.cu:"), std::string::npos) << m;
    EXPECT_NE(m.find("cudaGetDeviceProperties failed: cudaErrorInvalidDevice"), std::string::npos) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    std::printf("message: %s\n", m.c_str());
  }
  // A bad argument to a kernel entry point is a dsv3::Error naming the op.
  try {
    moe_route(nullptr, 10, 1, 10, nullptr, RouterConfig{3, 1, 1, true, 1.0f}, nullptr, nullptr);
    FAIL() << "bad router config did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("moe_route"), std::string::npos) << e.what();
  }
  // The device still works afterwards.
  const std::vector<float> h(16, 2.5f);
  copy_to_device(a.get(), h.data(), 64);
  EXPECT_EQ(download(a), h);
}

}  // namespace
}  // namespace dsv3::cuda
