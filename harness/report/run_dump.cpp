#include "harness/report/run_dump.h"

#include <torch/version.h>

#include <fmt/format.h>

#include "cpharness/version.h"

#include <string_view>
#include <vector>

#include "harness/io/error_text.h"
#include "harness/io/hdf5_probe.h"
#include "harness/io/input_error.h"

namespace cpharness::report {
namespace {

bool valid_kind(const std::string& k) { return k == kKindGolden || k == kKindDump || k == kKindHfExport; }

// A decimal index as the layout writes it: digits only, no sign, no leading zeros, fits int64.
std::optional<std::int64_t> parse_index(std::string_view s) {
  if (s.empty() || s.size() > 18) return std::nullopt;
  if (s.size() > 1 && s[0] == '0') return std::nullopt;
  std::int64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    v = v * 10 + (c - '0');
  }
  return v;
}

// The provenance must say which of the three kinds of file this is.
void check_kind(const std::string& path, const io::StringMap& provenance) {
  auto kind = provenance.find("kind");
  if (kind == provenance.end())
    throw io::InputError(path, "/provenance@kind", "missing (\"golden\", \"dump\" or \"hf-export\")");
  if (!valid_kind(kind->second))
    throw io::InputError(path, "/provenance@kind",
                         "is \"" + kind->second + "\", expected \"golden\", \"dump\" or \"hf-export\"");
}

std::vector<std::string> split(const std::string& name) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : name) {
    if (c == '/') {
      out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  out.push_back(cur);
  return out;
}

void check_name(const std::string& path, const std::string& what, const std::string& name) {
  if (name.empty()) throw io::InputError(path, what, "name must not be empty");
  if (name.find('/') != std::string::npos) throw io::InputError(path, what + "/" + name, "name must not contain '/'");
  if (name == "." || name == "..") throw io::InputError(path, what + "/" + name, "name must not be \".\" or \"..\"");
}

void check_tensor(const std::string& path, const std::string& what, const torch::Tensor& t) {
  if (!t.defined()) throw io::InputError(path, what, "tensor is undefined");
}

double read_scalar(const io::Hdf5Reader& r, const std::string& name) {
  torch::Tensor t = r.read(name);
  if (!at::isFloatingType(t.scalar_type()))
    throw io::InputError(r.path(), "/" + name,
                         std::string("must be a floating-point scalar (float64), stored dtype is ") +
                             c10::toString(t.scalar_type()));
  if (t.numel() != 1 || t.dim() > 1)
    throw io::InputError(r.path(), "/" + name,
                         "must be one value (0-d, or shape [1]), has shape " + io::shape_text(t.sizes().vec()));
  return t.to(torch::kDouble).reshape({}).item<double>();
}

// Logits, hidden states, gradients and weights are floating point: an integer or bool one (h5py writes any dtype)
// is no run's output, and a uint64 one was an internal error ("where_cpu" not implemented for 'UInt64').
torch::Tensor read_floating(const io::Hdf5Reader& r, const std::string& name) {
  torch::Tensor t = r.read(name);
  if (!at::isFloatingType(t.scalar_type()))
    throw io::InputError(r.path(), "/" + name,
                         std::string("must be floating point (float32, float64, bfloat16 or float16), stored dtype is ") +
                             c10::toString(t.scalar_type()));
  return t;
}

// Inputs are compared exactly, whatever they hold (another stack may store an attention mask as floats); only the
// wide unsigned types, which libtorch cannot compare, are refused here (the HF golden reader asks more of its own).
torch::Tensor read_input(const io::Hdf5Reader& r, const std::string& name) {
  torch::Tensor t = r.read(name);
  const auto type = t.scalar_type();
  if (type == torch::kUInt16 || type == torch::kUInt32 || type == torch::kUInt64)
    throw io::InputError(r.path(), "/" + name,
                         std::string("stored as ") + c10::toString(type) + ", which cannot be compared: store int64");
  return t;
}

// A count of bytes: one non-negative integer.
std::int64_t read_byte_count(const io::Hdf5Reader& r, const std::string& name) {
  torch::Tensor t = r.read(name);
  if (t.scalar_type() != torch::kInt64 && t.scalar_type() != torch::kInt32)
    throw io::InputError(r.path(), "/" + name,
                         std::string("must be an integer scalar (int64), stored dtype is ") + c10::toString(t.scalar_type()));
  if (t.numel() != 1 || t.dim() > 1)
    throw io::InputError(r.path(), "/" + name,
                         "must be one value (0-d, or shape [1]), has shape " + io::shape_text(t.sizes().vec()));
  const auto v = t.to(torch::kInt64).reshape({}).item<int64_t>();
  if (v < 0) throw io::InputError(r.path(), "/" + name, "a byte count must not be negative (" + std::to_string(v) + ")");
  return v;
}

}  // namespace

io::StringMap base_provenance(const std::string& kind) {
  return {{"tool", kToolName},
          {"tool_version", kToolVersion},
          {"git_sha", git_sha()},
          {"torch_version", TORCH_VERSION},
          {"kind", kind}};
}

void write_run_dump(const std::string& path, const RunDump& dump, bool replace_existing) {
  check_kind(path, dump.provenance);
  if (dump.steps.empty()) throw io::InputError(path, "/steps", "a run dump needs at least one step");

  // Validate everything before the writer creates its temp file.
  for (const auto& [name, t] : dump.inputs) {
    check_name(path, "/inputs", name);
    check_tensor(path, "/inputs/" + name, t);
  }
  for (const auto& [name, t] : dump.weights) {
    check_name(path, "/weights", name);
    check_tensor(path, "/weights/" + name, t);
  }
  for (const auto& [k, s] : dump.steps) {
    const std::string sp = fmt::format("/steps/{}", k);
    if (k < 0) throw io::InputError(path, sp, "step index must not be negative");
    if (s.activation_bytes && *s.activation_bytes < 0)
      throw io::InputError(path, sp + "/activation_bytes", "a byte count must not be negative");
    for (const auto& [i, t] : s.hidden) {
      if (i < 0) throw io::InputError(path, fmt::format("{}/hidden/{}", sp, i), "layer index must not be negative");
      check_tensor(path, fmt::format("{}/hidden/{}", sp, i), t);
    }
    for (const auto& [name, t] : s.grads) {
      check_name(path, sp + "/grads", name);
      check_tensor(path, sp + "/grads/" + name, t);
    }
  }

  io::Hdf5Writer w(path, replace_existing);
  w.set_attribute("/", "layout_version", kRunDumpLayoutVersion);
  for (const auto& [key, value] : dump.provenance) w.set_attribute("provenance", key, value);
  for (const auto& [name, t] : dump.inputs) w.write("inputs/" + name, t);
  for (const auto& [name, t] : dump.weights) w.write("weights/" + name, t);
  auto scalar = [](double v) { return torch::scalar_tensor(v, torch::TensorOptions().dtype(torch::kDouble)); };
  for (const auto& [k, s] : dump.steps) {
    const std::string sp = fmt::format("steps/{}/", k);
    w.write(sp + "loss", scalar(s.loss));
    if (s.grad_norm) w.write(sp + "grad_norm", scalar(*s.grad_norm));
    if (s.param_norm) w.write(sp + "param_norm", scalar(*s.param_norm));
    if (s.activation_bytes)
      w.write(sp + "activation_bytes", torch::scalar_tensor(*s.activation_bytes, torch::TensorOptions().dtype(torch::kInt64)));
    if (s.logits.defined()) w.write(sp + "logits", s.logits);
    for (const auto& [i, t] : s.hidden) w.write(fmt::format("{}hidden/{}", sp, i), t);
    for (const auto& [name, t] : s.grads) w.write(sp + "grads/" + name, t);
  }
  w.commit();
}

namespace {

// The root's layout version and the provenance, checked: what a dump is, before any of its tensors.
io::StringMap read_provenance(const io::Hdf5Reader& r, const std::string& path) {
  const io::StringMap root = r.attributes("/");
  auto lv = root.find("layout_version");
  if (lv == root.end()) {
    const auto other = r.non_string_attributes("/");  // there, but not a string: say so, not "missing"
    if (auto it = other.find("layout_version"); it != other.end())
      throw io::InputError(path, "/@layout_version", "stored as " + it->second + "; it is a string (see golden/README.md)");
    throw io::InputError(path, "/@layout_version",
                         "missing root attribute; not a cpharness run dump (see golden/README.md)");
  }
  if (lv->second != kRunDumpLayoutVersion)
    throw io::InputError(path, "/@layout_version",
                         "unsupported layout version \"" + lv->second + "\" (this build reads \"" +
                             kRunDumpLayoutVersion + "\")");

  io::StringMap provenance;
  try {
    provenance = r.attributes("provenance");
  } catch (const io::InputError&) {
    throw io::InputError(path, "/provenance", "missing group (string attributes tool, kind, ...)");
  }
  // Provenance values are strings: a number stored by h5py (attrs["case_id"] = 7) would otherwise read as missing.
  for (const auto& [key, kind] : r.non_string_attributes("provenance"))
    throw io::InputError(path, "/provenance@" + key,
                         "stored as " + kind + "; provenance attributes are strings (see golden/README.md)");
  check_kind(path, provenance);
  return provenance;
}

RunDump read_run_dump_here(const std::string& path) {
  io::Hdf5Reader r(path);
  RunDump dump;
  dump.provenance = read_provenance(r, path);

  try {
    (void)r.list_datasets("steps");
  } catch (const io::InputError& e) {
    // Only a /steps that is not there is "missing"; a soft link in it, or one in its place, says what it is.
    if (e.subject() == "steps" && e.reason() == "no such group")
      throw io::InputError(path, "/steps", "missing group (a run dump records at least one step)");
    throw;
  }

  std::map<std::int64_t, bool> has_loss;
  const auto found = r.contents("/");
  for (const std::string& name : found.datasets) {
    const std::vector<std::string> c = split(name);
    const std::string where = "/" + name;
    auto unknown = [&](const std::string& why) { return io::InputError(path, where, why + " (see golden/README.md)"); };
    if (c[0] == "inputs" || c[0] == "weights") {
      if (c.size() != 2) throw unknown("unexpected nesting: /" + c[0] + " holds datasets directly");
      if (c[0] == "inputs") dump.inputs.emplace(c[1], read_input(r, name));
      else dump.weights.emplace(c[1], read_floating(r, name));
    } else if (c[0] == "steps") {
      if (c.size() < 3) throw unknown("unexpected dataset directly under /steps");
      auto k = parse_index(c[1]);
      if (!k) throw io::InputError(path, "/steps/" + c[1], "step name is not a decimal step index");
      StepRecord& s = dump.steps[*k];
      has_loss.emplace(*k, false);
      const std::string& what = c[2];
      if (c.size() == 3 && what == "loss") {
        s.loss = read_scalar(r, name);
        has_loss[*k] = true;
      } else if (c.size() == 3 && what == "grad_norm") {
        s.grad_norm = read_scalar(r, name);
      } else if (c.size() == 3 && what == "param_norm") {
        s.param_norm = read_scalar(r, name);
      } else if (c.size() == 3 && what == "activation_bytes") {
        s.activation_bytes = read_byte_count(r, name);
      } else if (c.size() == 3 && what == "logits") {
        s.logits = read_floating(r, name);
      } else if (c.size() == 4 && what == "hidden") {
        auto i = parse_index(c[3]);
        if (!i) throw io::InputError(path, where, "hidden-state name is not a decimal layer index");
        s.hidden.emplace(*i, read_floating(r, name));
      } else if (c.size() == 4 && what == "grads") {
        s.grads.emplace(c[3], read_floating(r, name));
      } else {
        throw unknown("unknown entry in a step (expected loss, grad_norm, param_norm, activation_bytes, logits, hidden/<i>, grads/<name>)");
      }
    } else {
      throw unknown("unknown dataset (expected under /inputs, /weights or /steps)");
    }
  }
  // Groups hold what the layout names, even empty: a writer's typo (/step/0 beside /steps) or a step group left
  // without its datasets is refused, not silently read as nothing.
  for (const std::string& name : found.groups) {
    const std::vector<std::string> c = split(name);
    if (c[0] == "steps" && c.size() >= 2 && !parse_index(c[1]))
      throw io::InputError(path, "/steps/" + c[1], "step name is not a decimal step index");
    const bool known = (c.size() == 1 && (c[0] == "inputs" || c[0] == "weights" || c[0] == "steps" || c[0] == "provenance")) ||
                       (c[0] == "steps" && c.size() >= 2 && c.size() <= 3 && parse_index(c[1]) &&
                        (c.size() == 2 || c[2] == "hidden" || c[2] == "grads"));
    if (!known)
      throw io::InputError(path, "/" + name, "unknown group (expected /inputs, /weights, /provenance, /steps/<k>, "
                                             "/steps/<k>/hidden or /steps/<k>/grads; see golden/README.md)");
    if (c.size() == 2) has_loss.emplace(*parse_index(c[1]), false);  // a step group with no loss is missing it
  }
  if (dump.steps.empty() && has_loss.empty())
    throw io::InputError(path, "/steps", "holds no step (a run dump records at least one step)");
  for (const auto& [k, ok] : has_loss)
    if (!ok) throw io::InputError(path, fmt::format("/steps/{}/loss", k), "missing: every step records its loss");
  return dump;
}

}  // namespace

RunDump read_run_dump(const std::string& path) {
  io::read_in_a_child_first(path, [&] { (void)read_run_dump_here(path); });  // a damaged file: not in this process
  return read_run_dump_here(path);
}

io::StringMap read_run_dump_provenance(const std::string& path) {
  const auto read = [&] { return read_provenance(io::Hdf5Reader(path), path); };
  io::read_in_a_child_first(path, [&] { (void)read(); });  // (a damaged global heap crashed the attribute reads)
  return read();
}

}  // namespace cpharness::report
