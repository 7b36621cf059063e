// dsv3 compare: relative L2 error (‖a−b‖/‖b‖) of same-named tensors in two safetensors files; exits 1 when
// any exceeds --tol. The tool behind every golden comparison a user wants to repeat by hand.
#include <cmath>
#include <cstdio>

#include "io/safetensors.h"
#include "tools/commands.h"

namespace dsv3::cli {

namespace {
struct CompareArgs {
  std::string a, b;
  std::vector<std::string> names;
  double tol = 1e-5;
};

int run_compare(const CompareArgs& args) {
  auto fa = io::SafetensorsFile::open(args.a), fb = io::SafetensorsFile::open(args.b);
  std::vector<std::string> names = args.names.empty() ? fa->names() : args.names;
  int bad = 0;
  for (const auto& n : names) {
    DSV3_CHECK(fa->contains(n), "{}: no tensor '{}'", args.a, n);
    DSV3_CHECK(fb->contains(n), "{}: no tensor '{}'", args.b, n);
    Tensor x = fa->get(n), y = fb->get(n);
    DSV3_CHECK(x.shape() == y.shape(), "tensor '{}': shape {} in {} but {} in {}", n, shape_str(x.shape()), args.a,
               shape_str(y.shape()), args.b);
    x = x.to(DType::F32), y = y.to(DType::F32);
    double num = 0, den = 0;
    for (int64_t i = 0; i < x.numel(); ++i) {
      const double d = double(x.f32()[i]) - double(y.f32()[i]);
      num += d * d, den += double(y.f32()[i]) * double(y.f32()[i]);
    }
    const double rel = std::sqrt(num / (den > 0 ? den : 1.0));
    const bool ok = rel <= args.tol;
    bad += !ok;
    std::printf("%-40s %-14s rel_l2 %.3e %s\n", n.c_str(), shape_str(x.shape()).c_str(), rel, ok ? "ok" : "FAIL");
  }
  return bad ? 1 : 0;
}
}  // namespace

void add_compare(CLI::App& app, Command& run) {
  auto a = std::make_shared<CompareArgs>();
  CLI::App* sub = app.add_subcommand("compare", "Relative L2 error between same-named tensors of two safetensors files");
  sub->add_option("A", a->a, "safetensors file (measured)")->required();
  sub->add_option("B", a->b, "safetensors file (reference)")->required();
  sub->add_option("names", a->names, "tensor names (default: every tensor in A)");
  sub->add_option("--tol", a->tol, "fail above this relative L2 error (default 1e-5)");
  sub->callback([a, &run] { run = [a] { return run_compare(*a); }; });
}

}  // namespace dsv3::cli
