// dsv3: one binary, one subcommand per job. Errors print one line to stderr and exit non-zero.
#include <omp.h>

#include <CLI/CLI.hpp>
#include <cstdio>

#include "core/error.h"
#include "tools/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"dsv3 — DeepSeek-V3 in C++: run and inspect DeepSeek-V3-architecture checkpoints"};
  app.require_subcommand(1, 1);
  app.set_version_flag("--version", "dsv3 0.1");
  int threads = 0;
  app.add_option("--threads", threads, "CPU threads (default: all cores)")->check(CLI::PositiveNumber);
  dsv3::cli::Command run;  // set by the parsed subcommand
  dsv3::cli::add_forward(app, run);
  dsv3::cli::add_grad(app, run);
  dsv3::cli::add_info(app, run);
  dsv3::cli::add_compare(app, run);
  dsv3::cli::add_generate(app, run);
  dsv3::cli::add_chat(app, run);
  dsv3::cli::add_tokenize(app, run);
  dsv3::cli::add_train(app, run);
  dsv3::cli::add_tokenizer(app, run);
  dsv3::cli::add_data(app, run);
  dsv3::cli::add_init(app, run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (threads > 0) omp_set_num_threads(threads);
  try {
    return run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsv3 %s: error: %s\n", app.get_subcommands().at(0)->get_name().c_str(), e.what());
    return 1;
  }
}
