// safetensors reading (mmap + up-front header validation), checkpoint folders and atomic writing.
// The header is untrusted: every size, offset and product is range-checked before it is used, so a
// corrupt file can only ever produce a dsv3::Error, never an out-of-bounds read.
#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

namespace dsv3::io {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// The reference implementation refuses headers over 100 MB; a bigger length is corruption, not a model.
constexpr uint64_t kMaxHeader = 100u << 20;
constexpr int kMaxJsonDepth = 64;

std::string errno_str() { return std::strerror(errno); }

// A JSON value for an error message: dump() escapes control characters, so the message stays one line.
std::string show(const json& v) {
  std::string s = v.dump(-1, ' ', true, json::error_handler_t::replace);
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

// A name in single quotes with control characters escaped, so an error message stays one line.
std::string quote(const std::string& s) {
  const std::string d = json(s).dump(-1, ' ', false, json::error_handler_t::replace);
  std::string r = "'";
  r.append(d, 1, d.size() - 2);  // without dump()'s double quotes
  return r += '\'';
}

// nlohmann keeps only one of two equal keys, which would silently hide a tensor; the parser callback
// sees every key, so duplicates (at any depth) are caught here. The depth cap bounds the parser's
// memory on hostile input.
json parse_json(const std::string& origin, const char* begin, const char* end) {
  struct Level {
    std::string owner;  // the key this object is the value of ("" at the top)
    std::set<std::string> keys;
  };
  std::vector<Level> levels;
  std::string last_key;
  auto cb = [&](int depth, json::parse_event_t ev, json& v) {
    if ((ev == json::parse_event_t::object_start || ev == json::parse_event_t::array_start) && depth >= kMaxJsonDepth)
      fail("{}: JSON nested deeper than {} levels", origin, kMaxJsonDepth);
    if (ev == json::parse_event_t::object_start) levels.push_back({depth ? last_key : "", {}});
    if (ev == json::parse_event_t::object_end && !levels.empty()) levels.pop_back();
    if (ev == json::parse_event_t::key && !levels.empty()) {
      last_key = v.get<std::string>();
      Level& l = levels.back();
      if (!l.keys.insert(last_key).second)
        fail("{}: duplicate key {}{}", origin, quote(last_key), l.owner.empty() ? "" : " in " + quote(l.owner));
    }
    return true;
  };
  try {
    return json::parse(begin, end, cb);
  } catch (const json::exception& e) {
    std::string msg = e.what();
    std::replace(msg.begin(), msg.end(), '\n', ' ');
    fail("{}: invalid JSON: {}", origin, msg);
  }
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::optional<uint64_t> as_u64(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0) return uint64_t(v.get<int64_t>());
  return std::nullopt;
}

// One header entry -> TensorInfo, checking types, shape and that the byte range fits the data section
// and is exactly numel × dtype_size (computed without overflow).
TensorInfo parse_entry(const std::string& path, const std::string& name, const json& e, uint64_t data_size) {
  auto bad = [&](const std::string& what) { fail("{}: tensor {}: {}", path, quote(name), what); };
  if (!e.is_object()) bad("entry must be an object, got " + show(e));
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!e.contains(key)) bad(fmt::format("missing '{}'", key));
  TensorInfo t;
  t.name = name;
  const json &dt = e["dtype"], &sh = e["shape"], &off = e["data_offsets"];
  if (!dt.is_string()) bad("dtype must be a string, got " + show(dt));
  auto d = dtype_from_name(dt.get<std::string>());
  if (!d) bad("unknown dtype " + show(dt));
  t.dtype = *d;
  if (!sh.is_array()) bad("shape must be an array of integers, got " + show(sh));
  for (const json& x : sh) {
    if (!x.is_number_integer()) bad("shape must be an array of integers, got " + show(sh));
    if (!x.is_number_unsigned() && x.get<int64_t>() < 0) bad("negative dimension in shape " + show(sh));
    if (x.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max())) bad("dimension too large in shape " + show(sh));
    t.shape.push_back(x.get<int64_t>());
  }
  // numel x dtype_size must fit int64 (Tensor's numel type); a zero dimension makes it 0 regardless.
  const uint64_t es = dtype_size(t.dtype), limit = uint64_t(std::numeric_limits<int64_t>::max()) / es;
  uint64_t numel = 1;
  if (std::find(t.shape.begin(), t.shape.end(), 0) != t.shape.end()) numel = 0;
  for (int64_t dim : t.shape) {
    if (numel == 0) break;
    if (uint64_t(dim) > limit / numel) bad(fmt::format("shape {} x {} is too large", shape_str(t.shape), dtype_name(t.dtype)));
    numel *= uint64_t(dim);
  }
  if (!off.is_array() || off.size() != 2 || !as_u64(off[0]) || !as_u64(off[1]))
    bad("data_offsets must be [begin, end] with non-negative integers, got " + show(off));
  t.begin = *as_u64(off[0]);
  t.end = *as_u64(off[1]);
  if (t.begin > t.end) bad(fmt::format("data_offsets [{}, {}) have begin > end", t.begin, t.end));
  if (t.end > data_size)
    bad(fmt::format("data_offsets [{}, {}) run past the data section ({} bytes)", t.begin, t.end, data_size));
  if (t.end - t.begin != numel * es)
    bad(fmt::format("data_offsets [{}, {}) do not match shape {} x {} ({} bytes)", t.begin, t.end, shape_str(t.shape),
                    dtype_name(t.dtype), numel * es));
  return t;
}

void check_no_overlap(const std::string& path, const std::map<std::string, TensorInfo>& infos) {
  std::vector<const TensorInfo*> v;
  for (const auto& [_, t] : infos)
    if (t.end > t.begin) v.push_back(&t);  // empty tensors occupy no bytes
  std::sort(v.begin(), v.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < v.size(); ++i)
    if (v[i]->begin < v[i - 1]->end)
      fail("{}: tensor {}: data_offsets [{}, {}) overlap tensor {} [{}, {})", path, quote(v[i]->name), v[i]->begin,
           v[i]->end, quote(v[i - 1]->name), v[i - 1]->begin, v[i - 1]->end);
}

}  // namespace

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  struct Fd {
    int fd;
    ~Fd() { if (fd >= 0) ::close(fd); }  // the mapping stays valid without the descriptor
  } fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (fd.fd < 0) fail("{}: cannot open: {}", path, errno_str());
  struct stat st {};
  if (fstat(fd.fd, &st) != 0) fail("{}: cannot stat: {}", path, errno_str());
  if (!S_ISREG(st.st_mode)) fail("{}: not a regular file", path);
  const uint64_t size = uint64_t(st.st_size);
  if (size < 8) fail("{}: file is {} bytes, shorter than the 8-byte header length", path, size);
  void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd.fd, 0);
  if (p == MAP_FAILED) fail("{}: cannot mmap {} bytes: {}", path, size, errno_str());
  f->mapping_ = std::shared_ptr<void>(p, [size](void* q) { munmap(q, size); });
  const auto* bytes = static_cast<const uint8_t*>(p);

  const uint64_t n = read_u64_le(bytes);
  if (n > size - 8) fail("{}: header length {} runs past the end of the file ({} bytes)", path, n, size);
  if (n > kMaxHeader) fail("{}: header length {} exceeds the {}-byte limit", path, n, kMaxHeader);
  const char* h = reinterpret_cast<const char*>(bytes + 8);
  const json header = parse_json(path + ": header", h, h + n);
  if (!header.is_object()) fail("{}: header must be a JSON object, got {}", path, show(header));
  const uint64_t data_size = size - 8 - n;
  f->data_ = bytes + 8 + n;

  for (const auto& [name, e] : header.items()) {
    if (name != "__metadata__") {
      f->infos_.emplace(name, parse_entry(path, name, e, data_size));
      continue;
    }
    if (!e.is_object()) fail("{}: __metadata__ must be an object of strings, got {}", path, show(e));
    for (const auto& [k, v] : e.items()) {
      if (!v.is_string()) fail("{}: __metadata__ {} must be a string, got {}", path, quote(k), show(v));
      f->metadata_[k] = v.get<std::string>();
    }
  }
  check_no_overlap(path, f->infos_);
  return f;
}

SafetensorsFile::~SafetensorsFile() = default;

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> v;
  for (const auto& kv : infos_) v.push_back(kv.first);
  return v;
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = infos_.find(name);
  if (it == infos_.end()) fail("{}: no tensor {}", path_, quote(name));
  return it->second;
}

Tensor SafetensorsFile::get(const std::string& name) const {
  const TensorInfo& t = info(name);
  const uint8_t* p = data_ + t.begin;
  // Offsets need not be multiples of the element size (a packed BF16 before an F32); typed access to a
  // misaligned pointer is undefined behaviour, so such a tensor is copied instead of borrowed.
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(t.dtype) != 0) {
    Tensor c = Tensor::empty(t.dtype, t.shape);
    std::memcpy(c.raw(), p, t.end - t.begin);
    return c;
  }
  return Tensor::borrow(const_cast<uint8_t*>(p), t.dtype, t.shape, mapping_);
}

// ---------------------------------------------------------------------------------------------------

Checkpoint Checkpoint::open(const std::string& dir) {
  Checkpoint c;
  c.dir_ = dir;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) fail("{}: checkpoint folder does not exist or is not a folder", dir);
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  auto shard = [&](const std::string& file) -> SafetensorsFile& {
    auto& f = c.files_[file];
    if (!f) f = SafetensorsFile::open(file);
    return *f;
  };

  if (fs::exists(index, ec)) {
    const std::string ip = index.string();
    std::ifstream in(index, std::ios::binary);
    if (!in) fail("{}: cannot read", ip);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const json j = parse_json(ip, text.data(), text.data() + text.size());
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      fail("{}: expected an object with a 'weight_map' object", ip);
    for (const auto& [name, v] : j["weight_map"].items()) {
      if (!v.is_string()) fail("{}: weight_map: tensor {} maps to {}, not a file name", ip, quote(name), show(v));
      const std::string file = (fs::path(dir) / v.get<std::string>()).string();
      if (!fs::is_regular_file(file, ec)) fail("{}: weight_map: tensor {} is in missing file {}", ip, quote(name), file);
      if (!shard(file).contains(name)) fail("{}: weight_map: tensor {} is not in {}", ip, quote(name), file);
      c.where_[name] = file;
    }
    return c;
  }

  std::vector<std::string> files;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    if (it->path().extension() == ".safetensors") files.push_back(it->path().string());
  if (ec) fail("{}: cannot list folder: {}", dir, ec.message());
  if (files.empty()) fail("{}: no *.safetensors files and no model.safetensors.index.json", dir);
  std::sort(files.begin(), files.end());
  for (const std::string& file : files) {
    for (const std::string& name : shard(file).names()) {
      auto [it, fresh] = c.where_.emplace(name, file);
      if (!fresh) fail("{}: tensor {} is in both {} and {}", dir, quote(name), it->second, file);
    }
  }
  return c;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> v;
  for (const auto& kv : where_) v.push_back(kv.first);
  return v;
}

const std::string& Checkpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail("{}: checkpoint has no tensor {}", dir_, quote(name));
  return it->second;
}

const TensorInfo& Checkpoint::info(const std::string& name) const { return files_.at(file_of(name))->info(name); }
Tensor Checkpoint::get(const std::string& name) const { return files_.at(file_of(name))->get(name); }

// ---------------------------------------------------------------------------------------------------

namespace {

// A temporary file next to the destination that is removed unless commit() renamed it into place.
class TempFile {
 public:
  explicit TempFile(const std::string& dest) : dest_(dest), tmp_(dest + ".tmp.XXXXXX") {
    fd_ = mkstemp(tmp_.data());
    if (fd_ < 0) fail("{}: cannot create a temporary file: {}", dest_, errno_str());
    fchmod(fd_, 0644);  // mkstemp's 0600 would leave the checkpoint unreadable to others
  }
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }
  void write(const void* p, size_t n) {
    const char* c = static_cast<const char*>(p);
    while (n > 0) {
      const ssize_t w = ::write(fd_, c, std::min<size_t>(n, size_t(1) << 30));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) fail("{}: write failed: {}", dest_, w < 0 ? errno_str() : "no progress");
      c += w;
      n -= size_t(w);
    }
  }
  void commit() {
    if (fsync(fd_) != 0) fail("{}: fsync failed: {}", dest_, errno_str());
    const int rc = ::close(fd_);
    fd_ = -1;
    if (rc != 0) fail("{}: close failed: {}", dest_, errno_str());
    if (std::rename(tmp_.c_str(), dest_.c_str()) != 0) fail("{}: cannot rename {} into place: {}", dest_, tmp_, errno_str());
    committed_ = true;
    // Make the rename itself durable; a failure here cannot undo it, so it is best effort.
    const fs::path dir = fs::path(dest_).parent_path();
    const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) fsync(dfd), ::close(dfd);
  }

 private:
  std::string dest_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<Tensor> data;
  std::set<std::string> seen;
  uint64_t off = 0;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") fail("{}: tensor name '__metadata__' is reserved", path);
    if (!seen.insert(name).second) fail("{}: tensor {} given twice", path, quote(name));
    if (!t.defined()) fail("{}: tensor {} is undefined", path, quote(name));
    if (t.device() != Device::CPU) fail("{}: tensor {} is not on the CPU", path, quote(name));
    data.push_back(t.contiguous());
    header[name] = {{"dtype", dtype_name(t.dtype())}, {"shape", t.shape()}, {"data_offsets", {off, off + t.nbytes()}}};
    off += t.nbytes();
  }
  std::string h;
  try {
    h = header.dump();
  } catch (const nlohmann::json::exception& e) {
    fail("{}: cannot encode the header (tensor names and metadata must be UTF-8): {}", path, e.what());
  }
  h.append((8 - h.size() % 8) % 8, ' ');  // data section starts 8-byte aligned
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(h.size()) >> (8 * i));

  TempFile tmp(path);
  tmp.write(len, 8);
  tmp.write(h.data(), h.size());
  for (const Tensor& t : data) tmp.write(t.raw(), t.nbytes());
  tmp.commit();
}

}  // namespace dsv3::io
