// The DeepSeek-V3 chat format: <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{reply}<｜end▁of▁sentence｜>...
// ending with <｜Assistant｜> when a reply is to be generated (the official chat template).
#pragma once
#include <string>
#include <vector>

namespace dsv3 {

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

// Several system messages are joined with a blank line, as the official template does. An unknown role is
// an Error.
std::string render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt = true);

}  // namespace dsv3
