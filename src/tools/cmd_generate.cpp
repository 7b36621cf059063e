// dsv3 generate: text (or token ids) in, continuation out, streamed; several prompts share each forward
// pass with --prompts-file.
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tools/commands.h"
#include "tools/gen_common.h"

namespace dsv3::cli {

namespace {
struct GenerateArgs : GenArgs {
  std::string prompt, prompt_ids, prompts_file;
  bool print_ids = false, no_bos = false;
};

std::vector<int64_t> parse_ids(const std::string& s) {
  std::vector<int64_t> ids;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    int64_t v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    DSV3_CHECK(used > 0 && item.find_first_not_of(" \t", used) == std::string::npos, "--prompt-ids: '{}' is not an integer", item);
    ids.push_back(v);
  }
  DSV3_CHECK(!ids.empty(), "--prompt-ids is empty");
  return ids;
}

std::string join_ids(const std::vector<int64_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s;
}

std::vector<int64_t> encode_prompt(const Tokenizer& tok, const std::string& text, bool bos) {
  std::vector<int64_t> ids;
  if (bos && tok.bos_id()) ids.push_back(*tok.bos_id());
  for (int32_t t : tok.encode(text)) ids.push_back(t);
  return ids;
}

int run_generate(GenerateArgs& a) {
  const int sources = !a.prompt.empty() + !a.prompt_ids.empty() + !a.prompts_file.empty();
  DSV3_CHECK(sources == 1, "give exactly one of --prompt, --prompt-ids, --prompts-file");
  DSV3_CHECK(a.max_new_tokens >= 1, "--max-new-tokens must be at least 1, got {}", a.max_new_tokens);
  auto tok = find_tokenizer(a, a.prompt_ids.empty() || !a.stop.empty());
  std::vector<std::vector<int64_t>> prompts;
  if (!a.prompt_ids.empty()) {
    prompts.push_back(parse_ids(a.prompt_ids));
  } else if (!a.prompt.empty()) {
    prompts.push_back(encode_prompt(*tok, a.prompt, !a.no_bos));
  } else {
    std::ifstream in(a.prompts_file);
    DSV3_CHECK(in.good(), "{}: cannot open", a.prompts_file);
    std::string line;
    for (int n = 1; std::getline(in, line); ++n) {
      if (line.empty()) continue;
      // A line is plain text, or a JSON object {"prompt": "..."} for prompts with newlines.
      std::string text = line;
      if (line.front() == '{') {
        auto j = nlohmann::json::parse(line, nullptr, false);
        DSV3_CHECK(j.is_object() && j.contains("prompt") && j["prompt"].is_string(), "{}:{}: expected {{\"prompt\": \"...\"}}",
                   a.prompts_file, n);
        text = j["prompt"].get<std::string>();
      }
      try {
        prompts.push_back(encode_prompt(*tok, text, !a.no_bos));
      } catch (const Error& e) {
        fail("{}:{}: {}", a.prompts_file, n, e.what());
      }
    }
    DSV3_CHECK(!prompts.empty(), "{}: no prompts", a.prompts_file);
  }
  const LoadedModel model = LoadedModel::load(a.model, a, prompts.size() == 1);
  GenerateOptions o = generate_options(a, model.config(), tok ? &*tok : nullptr);
  Generator gen(model.stepper());
  const bool stream = prompts.size() == 1 && tok;
  std::vector<std::string> texts(prompts.size());
  std::vector<std::optional<StreamDecoder>> decs(prompts.size());
  std::vector<StopFilter> stops(prompts.size(), StopFilter(a.stop));
  for (size_t s = 0; s < prompts.size(); ++s)
    if (tok) decs[s].emplace(*tok);
  auto results = gen.generate(prompts, o, [&](size_t s, int64_t t) {
    if (!tok) return true;
    const std::string piece = stops[s].push(decs[s]->push(int32_t(t)));
    texts[s] += piece;
    if (stream) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
    return !stops[s].stopped();
  });
  for (size_t s = 0; s < prompts.size(); ++s) {
    if (!tok) continue;
    const std::string rest = stops[s].push(decs[s]->flush()) + stops[s].finish();
    texts[s] += rest;
    if (stream) std::fwrite(rest.data(), 1, rest.size(), stdout);
  }
  if (stream) std::fputs("\n", stdout);
  if (prompts.size() > 1) {
    for (size_t s = 0; s < prompts.size(); ++s) {
      nlohmann::json j{{"index", s}, {"ids", results[s].tokens}};
      if (tok) j["text"] = texts[s];
      std::puts(j.dump().c_str());
    }
  } else if (a.print_ids || !tok) {
    std::puts(join_ids(results[0].tokens).c_str());
  }
  report_speed(gen.stats());
  return 0;
}
}  // namespace

void add_generate(CLI::App& app, Command& run) {
  auto a = std::make_shared<GenerateArgs>();
  CLI::App* sub = app.add_subcommand("generate", "Generate a continuation of a prompt (streamed to stdout)");
  add_generation_options(sub, *a, 64);
  sub->add_option("--prompt", a->prompt, "Prompt text (BOS is prepended unless --no-bos)");
  sub->add_option("--prompt-ids", a->prompt_ids, "Prompt as comma-separated token ids (used as given)");
  sub->add_option("--prompts-file", a->prompts_file,
                  "One prompt per line (text, or {\"prompt\": ...}); all are generated together; prints JSON lines");
  sub->add_flag("--print-ids", a->print_ids, "Print the generated ids, comma-separated, as the last line of stdout");
  sub->add_flag("--no-bos", a->no_bos, "Do not prepend the BOS token to text prompts");
  sub->callback([a, &run] { run = [a] { return run_generate(*a); }; });
}

}  // namespace dsv3::cli
