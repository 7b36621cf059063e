// safetensors: the checkpoint container of the official DeepSeek-V3 release.
// Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets:[b,e]},
// "__metadata__": {str: str}}, then the data section; offsets are relative to the data section.
// Reading mmaps the file and hands out borrowed tensors (no copies). Every malformed input throws
// dsv3::Error with one line naming the file (and the tensor where there is one).
#pragma once
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace dsv3::io {

struct TensorInfo {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin = 0, end = 0;  // byte offsets within the data section
};

class SafetensorsFile {
 public:
  // Validates the whole header up front: length, JSON, dtypes, shapes, offsets in range, size = numel×dtype,
  // no overlaps, no duplicate names.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return infos_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;  // throws "<path>: no tensor '<name>'"
  Tensor get(const std::string& name) const;              // borrowed view; keeps the mapping alive

 private:
  SafetensorsFile() = default;
  std::string path_;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, TensorInfo> infos_;
  std::shared_ptr<void> mapping_;  // munmap on release
  const uint8_t* data_ = nullptr;  // start of the data section
};

// A checkpoint folder: `model.safetensors.index.json` (weight_map: name -> shard file) when present,
// else every `*.safetensors` file in the folder (names must not repeat across files).
class Checkpoint {
 public:
  static Checkpoint open(const std::string& dir);
  const std::string& dir() const { return dir_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;  // throws "<dir>: checkpoint has no tensor '<name>'"
  Tensor get(const std::string& name) const;
  const std::string& file_of(const std::string& name) const;  // the shard's path

 private:
  std::string dir_;
  std::map<std::string, std::shared_ptr<SafetensorsFile>> files_;  // by path
  std::map<std::string, std::string> where_;                         // tensor name -> file path
};

// Writes tensors (any CPU tensor; non-contiguous ones are copied) atomically: a temporary file in the
// same folder, fsync, rename. On any error the destination is untouched and the temporary removed.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace dsv3::io
