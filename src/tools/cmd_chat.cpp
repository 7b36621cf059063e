// dsv3 chat: an interactive terminal chat in the DeepSeek-V3 chat format, replies streamed as they come.
// Lines starting with '/' are commands: /reset forgets the conversation, /exit (or end of input) quits.
#include <cstdio>
#include <unistd.h>

#include <iostream>

#include "tokenizer/chat.h"
#include "tools/commands.h"
#include "tools/gen_common.h"

namespace dsv3::cli {

namespace {
struct ChatArgs : GenArgs {
  std::string system;
};

int run_chat(ChatArgs& a) {
  Tokenizer tok = *find_tokenizer(a, true);
  const LoadedModel model = LoadedModel::load(a.model, a, true);
  GenerateOptions o = generate_options(a, model.config(), &tok);
  std::vector<ChatMessage> history;
  if (!a.system.empty()) history.push_back({"system", a.system});
  const bool tty = isatty(0);
  std::fprintf(stderr, "dsv3 chat — /reset to start over, /exit to quit\n");
  std::string line;
  for (int turn = 0;; ++turn) {
    if (tty) std::fputs("\n> ", stdout), std::fflush(stdout);
    if (!std::getline(std::cin, line) || line == "/exit") break;
    if (line == "/reset") {
      history.resize(a.system.empty() ? 0 : 1);
      std::fputs("(conversation reset)\n", stdout);
      continue;
    }
    if (line.empty()) continue;
    history.push_back({"user", line});
    std::vector<int64_t> ids;
    try {
      for (int32_t t : tok.encode(render_chat(history))) ids.push_back(t);
    } catch (const Error& e) {
      std::fprintf(stderr, "error: %s\n", e.what());
      history.pop_back();
      continue;
    }
    StreamDecoder dec(tok);
    StopFilter stop(a.stop);
    std::string reply;
    o.sampling.seed = a.sampling.seed + uint64_t(turn);
    Generator gen(model.stepper());
    gen.generate({ids}, o, [&](size_t, int64_t t) {
      if (tok.is_special(int32_t(t))) return true;  // the end-of-sentence token ends the turn, unprinted
      const std::string piece = stop.push(dec.push(int32_t(t)));
      reply += piece;
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
      return !stop.stopped();
    });
    const std::string rest = stop.push(dec.flush()) + stop.finish();
    reply += rest;
    std::fputs((rest + "\n").c_str(), stdout);
    std::fflush(stdout);
    report_speed(gen.stats());
    history.push_back({"assistant", reply});
  }
  return 0;
}
}  // namespace

void add_chat(CLI::App& app, Command& run) {
  auto a = std::make_shared<ChatArgs>();
  CLI::App* sub = app.add_subcommand("chat", "Interactive chat in the DeepSeek-V3 chat format");
  add_generation_options(sub, *a, 512);
  a->sampling.temperature = 0.7f;
  a->sampling.top_p = 0.95f;
  sub->add_option("--system", a->system, "System prompt");
  sub->callback([a, &run] { run = [a] { return run_chat(*a); }; });
}

}  // namespace dsv3::cli
