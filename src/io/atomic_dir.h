// Folders that must never be seen half-written (checkpoints): fill a sibling temporary folder, then swap it
// in with renames. A crash at any point leaves either the previous folder or the new one, recoverable by
// recover_dir().
#pragma once
#include <functional>
#include <string>

namespace dsv3::io {

// Calls fill(tmp) on an empty temporary folder next to `target`, then replaces `target` with it. If fill
// throws, the temporary is removed and `target` is untouched.
void replace_dir_atomically(const std::string& target, const std::function<void(const std::string& tmp)>& fill);

// After a crash between the two renames of replace_dir_atomically, `target` is missing and its previous
// version sits at `target.old`: move it back. Leftover temporaries are removed. Safe to call any time.
void recover_dir(const std::string& target);

}  // namespace dsv3::io
