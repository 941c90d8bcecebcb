#include "harness/io/json_input.h"

#include <ios>
#include <limits>

#include <set>
#include <vector>

#include "harness/io/input_error.h"
#include "harness/io/json_depth.h"

namespace cpharness::io {
namespace {

using json = nlohmann::json;

// Follows the parser's events to know where it is: one frame per open object (its keys so far) or array (its
// element count), so that a repeated key is named by its full path.
class DuplicateKeyWatch {
 public:
  bool operator()(int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        count_element();
        frames_.push_back({event == json::parse_event_t::object_start, {}, {}, 0});
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!frames_.empty()) frames_.pop_back();
        break;
      case json::parse_event_t::key:
        if (!frames_.empty()) {
          auto& frame = frames_.back();
          frame.key = parsed.get<std::string>();
          if (!frame.keys.insert(frame.key).second && duplicate_.empty()) duplicate_ = path();
        }
        break;
      case json::parse_event_t::value:
        count_element();
        break;
    }
    return true;  // keep everything: the document is refused afterwards, with the first repeated key
  }
  const std::string& duplicate() const { return duplicate_; }

 private:
  struct Frame {
    bool object;
    std::set<std::string> keys;
    std::string key;    // objects: the key being read
    int64_t count = 0;  // arrays: elements so far
  };
  void count_element() {
    if (!frames_.empty() && !frames_.back().object) ++frames_.back().count;
  }
  std::string path() const {
    std::string p;
    for (const auto& f : frames_) {
      if (f.object) p += (p.empty() ? "" : ".") + f.key;
      else p += "[" + std::to_string(f.count - 1) + "]";
    }
    return p;
  }
  std::vector<Frame> frames_;
  std::string duplicate_;
};

template <class Source>
json parse_strictly(Source&& source, const std::string& file, const std::string& what, const std::string& key_prefix) {
  DuplicateKeyWatch watch;
  json j;
  try {
    j = json::parse(std::forward<Source>(source), std::ref(watch));
  } catch (const json::exception& e) {  // parse errors, and numbers out of range (1e400)
    throw InputError(file, what, "malformed JSON: " + json_error_text(e));
  } catch (const std::ios_base::failure& e) {  // a read error under the stream (EIO: /proc/self/mem, a failing disk)
    throw InputError(file, what, std::string("cannot read: ") + e.code().message());
  }
  require_json_depth(j, file, what);  // before anything copies it (a copy recurses once per level)
  if (!watch.duplicate().empty())
    throw InputError(file, key_prefix + watch.duplicate(),
                     "given twice in one object (a JSON reader would silently keep one of the two)");
  return j;
}

}  // namespace

int64_t json_int64(const json& v, const std::string& file, const std::string& field) {
  if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
    throw InputError(file, field, std::to_string(v.get<uint64_t>()) + " is out of range (at most 2^63 - 1)");
  return v.get<int64_t>();
}

std::string json_error_text(const std::exception& e) {
  std::string why = e.what();
  if (why.rfind("[json.exception.", 0) == 0 && why.find("] ") != std::string::npos) why = why.substr(why.find("] ") + 2);
  return why;
}

json parse_input_json(std::istream& in, const std::string& file, const std::string& what, const std::string& key_prefix) {
  return parse_strictly(in, file, what, key_prefix);
}

json parse_input_json(const std::string& text, const std::string& file, const std::string& what,
                      const std::string& key_prefix) {
  return parse_strictly(text, file, what, key_prefix);
}

}  // namespace cpharness::io
