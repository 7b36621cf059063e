// dsv3 tokenize: JSON lines on stdin -> JSON lines on stdout. {"text": "..."} becomes {"ids": [...]}; with
// --decode, {"ids": [...]} becomes {"text": "..."}. Blank lines are skipped; any other malformed line stops the
// run with an error naming its line number (exit 1). Each output line is flushed, so it can serve as a pipe.
#include <cstdint>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "core/error.h"
#include "tokenizer/tokenizer.h"
#include "tools/commands.h"

namespace dsv3::cli {

namespace {
struct TokenizeArgs {
  std::string tokenizer;
  bool decode = false;
};

int run_tokenize(const TokenizeArgs& args) {
  const Tokenizer tok = Tokenizer::load(args.tokenizer);
  std::string line;
  for (size_t n = 1; std::getline(std::cin, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json in, out;
    try {
      in = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      fail("stdin line {}: invalid JSON: {}", n, e.what());
    }
    try {
      if (args.decode) {
        DSV3_CHECK(in.is_object() && in.contains("ids") && in["ids"].is_array(), "expected {{\"ids\": [...]}}");
        std::vector<int32_t> ids;
        for (const auto& v : in["ids"]) {
          DSV3_CHECK(v.is_number_integer() && v.get<int64_t>() >= INT32_MIN && v.get<int64_t>() <= INT32_MAX,
                     "ids must be integers");
          ids.push_back(v.get<int32_t>());
        }
        out["text"] = tok.decode(ids);
      } else {
        DSV3_CHECK(in.is_object() && in.contains("text") && in["text"].is_string(), "expected {{\"text\": \"...\"}}");
        out["ids"] = tok.encode(in["text"].get_ref<const std::string&>());
      }
    } catch (const Error& e) {
      fail("stdin line {}: {}", n, e.what());
    }
    std::cout << out.dump() << '\n' << std::flush;
  }
  return 0;
}
}  // namespace

void add_tokenize(CLI::App& app, Command& run) {
  auto a = std::make_shared<TokenizeArgs>();
  CLI::App* sub = app.add_subcommand("tokenize", "Encode {\"text\"} / decode {\"ids\"} JSON lines from stdin");
  sub->add_option("--tokenizer", a->tokenizer, "tokenizer.json")->required();
  sub->add_flag("--decode", a->decode, "read {\"ids\": [...]} lines and write {\"text\": \"...\"}");
  sub->callback([a, &run] { run = [a] { return run_tokenize(*a); }; });
}

}  // namespace dsv3::cli
