#include "tokenizer/chat.h"

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace dsv3 {

std::string render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  std::string system, turns;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "system") {
      system += (system.empty() ? "" : "\n\n") + m.content;
    } else if (m.role == "user") {
      turns += "<｜User｜>" + m.content;
    } else if (m.role == "assistant") {
      turns += "<｜Assistant｜>" + m.content + std::string(Tokenizer::kEosContent);
    } else {
      fail("message {}: unknown role '{}' (expected system, user or assistant)", i, m.role);
    }
  }
  std::string out = std::string(Tokenizer::kBosContent) + system + turns;
  if (add_generation_prompt) out += "<｜Assistant｜>";
  return out;
}

}  // namespace dsv3
