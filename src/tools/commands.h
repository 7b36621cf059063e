// Each subcommand registers its options and sets `run` when it is the one parsed.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>

namespace dsv3::cli {

using Command = std::function<int()>;

void add_forward(CLI::App& app, Command& run);
void add_grad(CLI::App& app, Command& run);
void add_info(CLI::App& app, Command& run);
void add_compare(CLI::App& app, Command& run);
void add_generate(CLI::App& app, Command& run);
void add_chat(CLI::App& app, Command& run);
void add_tokenize(CLI::App& app, Command& run);
void add_train(CLI::App& app, Command& run);
void add_tokenizer(CLI::App& app, Command& run);
void add_data(CLI::App& app, Command& run);
void add_init(CLI::App& app, Command& run);

}  // namespace dsv3::cli
