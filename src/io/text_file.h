// Plain text files for the data tools (tokenizer training, data preparation): reading a UTF-8 corpus with
// errors that point at the bad byte, and writing small outputs atomically.
#pragma once
#include <string>
#include <string_view>
#include <vector>

namespace dsv3::io {

// The files' contents, concatenated in order. A file that does not end with '\n' gets one appended before the
// next file, so a document boundary never falls inside a line. Errors: a missing/unreadable file, or invalid
// UTF-8 ("<file>: invalid UTF-8 at byte N", N the 0-based offset in that file).
std::string read_utf8_files(const std::vector<std::string>& paths);

// Writes `data` to a temporary file next to `path`, fsyncs it and renames it over `path`: readers see the old
// file or the new one, never a partial one. On error the temporary is removed and `path` is untouched.
void write_file_atomically(const std::string& path, std::string_view data);

}  // namespace dsv3::io
