#include "harness/report/json_report.h"

#include "harness/io/error_text.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include <fmt/format.h>

#include "harness/io/input_error.h"
#include "harness/io/json_input.h"

namespace cpharness::report {

using ojson = nlohmann::ordered_json;
using json = nlohmann::json;

namespace {

// ---- writing ---------------------------------------------------------------------------------------------

ojson check_json(const CheckResult& c);

const char* nonfinite_tag(double v) {
  if (std::isnan(v)) return "nan";
  return v > 0 ? "inf" : "-inf";
}

// A number, or its tag string where it is not finite (for series).
ojson series_value(double v) { return std::isfinite(v) ? ojson(v) : ojson(nonfinite_tag(v)); }

ojson series(const std::vector<double>& v) {
  ojson a = ojson::array();
  for (double x : v) a.push_back(series_value(x));
  return a;
}

// Writes key (number or null) and, when not finite, key_nonfinite.
void put_measure(ojson& o, const char* key, double v) {
  if (std::isfinite(v)) {
    o[key] = v;
  } else {
    o[key] = nullptr;
    o[std::string(key) + "_nonfinite"] = nonfinite_tag(v);
  }
}

double duration(double s) { return std::isfinite(s) && s > 0 ? s : 0.0; }

ojson opt_string(const std::optional<std::string>& s) { return s ? ojson(*s) : ojson(nullptr); }
ojson opt_int(const std::optional<int>& v) { return v ? ojson(*v) : ojson(nullptr); }

ojson counters_json(const CacheCounters& c) {
  return ojson{{"lookups", c.lookups}, {"builds", c.builds}, {"hits", c.hits},
               {"evictions", c.evictions}, {"resets", c.resets}};
}

ojson case_json(const CaseReport& c) {
  ojson o;
  o["id"] = c.id;
  o["description"] = c.description;
  o["cp_sizes"] = c.cp_sizes;
  o["dtype"] = c.dtype;
  o["status"] = to_string(c.status());
  o["skip_reason"] = opt_string(c.skip_reason_text());
  o["error"] = opt_string(c.error_reason());
  o["duration_s"] = duration(c.duration_s);
  ojson checks = ojson::array();
  for (const auto& k : c.checks) checks.push_back(check_json(k));
  o["checks"] = std::move(checks);
  ojson traj = ojson::object();
  for (const auto& [cp, t] : c.trajectories)
    traj[std::to_string(cp)] =
        ojson{{"loss", series(t.loss)}, {"grad_norm", series(t.grad_norm)}, {"param_norm", series(t.param_norm)}};
  o["trajectories"] = std::move(traj);
  ojson cache = ojson::object();
  for (const auto& [cp, ranks] : c.block_mask_cache) {
    ojson rs = ojson::array();
    for (const auto& steps : ranks) {
      ojson ss = ojson::array();
      for (const auto& s : steps) ss.push_back(counters_json(s));
      rs.push_back(std::move(ss));
    }
    cache[std::to_string(cp)] = std::move(rs);
  }
  o["block_mask_cache"] = std::move(cache);
  ojson ring = ojson::object();
  for (const auto& [cp, t] : c.ring) {
    ojson passes = ojson::array();
    for (const auto& p : t.passes) {
      passes.push_back(ojson{{"pass", p.pass}, {"comm_ops", p.comm_ops}, {"bytes", p.bytes}});
      if (p.peak_chunks > 0) passes.back()["peak_chunks"] = p.peak_chunks;
    }
    ring[std::to_string(cp)] = ojson{{"owners", t.owners}, {"passes", std::move(passes)}};
    if (!t.mode.empty()) ring[std::to_string(cp)]["mode"] = t.mode;
    if (!t.owners_by_pass.empty()) {
      ojson by = ojson::object();
      for (const auto& [pass, table] : t.owners_by_pass) by[pass] = table;
      ring[std::to_string(cp)]["owners_by_pass"] = std::move(by);
    }
  }
  o["ring"] = std::move(ring);
  if (c.reference_cp) o["reference_cp"] = *c.reference_cp;
  for (auto it = c.page.begin(); it != c.page.end(); ++it)
    o[it.key()] = ojson::parse(it.value().dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  if (!c.performance.empty()) {
    ojson perf = ojson::object();
    for (const auto& [cp, p] : c.performance) {
      std::vector<double> tps;
      for (double s : p.step_seconds) tps.push_back(s > 0 ? double(p.tokens_per_step) / s / std::max(1, p.devices) : 0.0);
      auto bytes = [](const std::vector<std::optional<int64_t>>& v) {
        ojson a = ojson::array();
        for (auto& b : v) a.push_back(b ? ojson(*b) : ojson(nullptr));
        return a;
      };
      perf[std::to_string(cp)] = ojson{{"device", p.device}, {"device_name", p.device_name}, {"devices", p.devices},
                                       {"tokens_per_step", p.tokens_per_step}, {"step_seconds", series(p.step_seconds)},
                                       {"tokens_per_s_per_device", series(tps)},
                                       {"peak_allocated_bytes", bytes(p.peak_allocated_bytes)},
                                       {"peak_reserved_bytes", bytes(p.peak_reserved_bytes)}};
    }
    o["performance"] = std::move(perf);
  }
  return o;
}

// The same JSON with every string and key valid UTF-8 (nlohmann's dump() throws on invalid UTF-8).
ojson sanitized(const ojson& j) {
  if (j.is_string()) return sanitize_utf8(j.get_ref<const std::string&>());
  if (j.is_array()) {
    ojson a = ojson::array();
    for (const auto& x : j) a.push_back(sanitized(x));
    return a;
  }
  if (j.is_object()) {
    ojson o = ojson::object();
    for (auto it = j.begin(); it != j.end(); ++it) o[sanitize_utf8(it.key())] = sanitized(it.value());
    return o;
  }
  return j;
}

// ---- reading ---------------------------------------------------------------------------------------------

// A JSON object being read: every key must be consumed (unknown keys are errors); errors name the key path.
class Obj {
 public:
  Obj(const json& j, std::string path, const std::string& source) : j_(j), path_(std::move(path)), source_(source) {
    if (!j_.is_object()) fail(path_, "expected an object, got " + std::string(j_.type_name()));
  }

  [[noreturn]] void fail(const std::string& where, const std::string& why) const {
    throw io::InputError(source_, where.empty() ? "<root>" : where, why);
  }
  std::string key_path(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }

  const json& at(const std::string& key) {
    auto it = j_.find(key);
    if (it == j_.end()) fail(key_path(key), "missing required key");
    seen_.insert(key);
    return *it;
  }
  bool has(const std::string& key) const { return j_.contains(key); }

  std::string str(const std::string& key) {
    const json& v = at(key);
    if (!v.is_string()) fail(key_path(key), "expected a string, got " + std::string(v.type_name()));
    return v.get<std::string>();
  }
  std::optional<std::string> opt_str(const std::string& key) {
    const json& v = at(key);
    if (v.is_null()) return std::nullopt;
    if (!v.is_string()) fail(key_path(key), "expected a string or null, got " + std::string(v.type_name()));
    return v.get<std::string>();
  }
  std::int64_t integer(const std::string& key, std::int64_t min = std::numeric_limits<std::int64_t>::min()) {
    return as_int(at(key), key_path(key), min);
  }
  std::optional<int> opt_int(const std::string& key, std::int64_t min) {
    const json& v = at(key);
    if (v.is_null()) return std::nullopt;
    return static_cast<int>(as_int(v, key_path(key), min));
  }
  double number(const std::string& key) {
    const json& v = at(key);
    if (!v.is_number()) fail(key_path(key), "expected a number, got " + std::string(v.type_name()));
    return v.get<double>();
  }
  // A measure: number, or null with "<key>_nonfinite".
  double measure(const std::string& key) {
    const json& v = at(key);
    const std::string tag_key = key + "_nonfinite";
    if (v.is_number()) {
      if (has(tag_key)) fail(key_path(tag_key), "present although " + key + " is a number");
      return v.get<double>();
    }
    if (!v.is_null()) fail(key_path(key), "expected a number or null, got " + std::string(v.type_name()));
    if (!has(tag_key)) fail(key_path(tag_key), "missing (required where " + key + " is null)");
    const json& t = at(tag_key);
    return tag_value(t, key_path(tag_key));
  }

  void finish() const {
    for (auto it = j_.begin(); it != j_.end(); ++it)
      if (!seen_.count(it.key())) fail(key_path(it.key()), "unknown key");
  }

  std::int64_t as_int(const json& v, const std::string& where, std::int64_t min) const {
    if (!v.is_number_integer()) fail(where, "expected an integer, got " + std::string(v.type_name()));
    const std::int64_t x = v.is_number_unsigned() ? static_cast<std::int64_t>(v.get<std::uint64_t>())
                                                  : v.get<std::int64_t>();
    if (x < min) fail(where, fmt::format("must be >= {}, got {}", min, x));
    return x;
  }
  double tag_value(const json& t, const std::string& where) const {
    if (t == "nan") return std::numeric_limits<double>::quiet_NaN();
    if (t == "inf") return std::numeric_limits<double>::infinity();
    if (t == "-inf") return -std::numeric_limits<double>::infinity();
    fail(where, "expected \"nan\", \"inf\" or \"-inf\", got " + io::describe_json(t));
  }
  const std::string& source() const { return source_; }

 private:
  const json& j_;
  std::string path_;
  const std::string& source_;
  std::set<std::string> seen_;
};

const json& array_at(Obj& o, const std::string& key) {
  const json& v = o.at(key);
  if (!v.is_array()) o.fail(o.key_path(key), "expected an array, got " + std::string(v.type_name()));
  return v;
}

std::vector<double> read_series(Obj& o, const std::string& key) {
  const json& a = array_at(o, key);
  std::vector<double> out;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const std::string where = fmt::format("{}[{}]", o.key_path(key), i);
    if (a[i].is_number()) out.push_back(a[i].get<double>());
    else if (a[i].is_string()) out.push_back(o.tag_value(a[i], where));
    else o.fail(where, "expected a number or \"nan\"/\"inf\"/\"-inf\", got " + std::string(a[i].type_name()));
  }
  return out;
}

int cp_key(const Obj& o, const std::string& key, const std::string& where) {
  if (key.empty() || key.size() > 6 || key[0] < '1' || key[0] > '9' ||
      key.find_first_not_of("0123456789") != std::string::npos)
    o.fail(where, "expected a cp size (a positive integer) as key, got \"" + key + "\"");
  return std::stoi(key);
}

template <class T, class F>
std::map<int, T> read_per_cp(Obj& parent, const std::string& key, F&& read_one) {
  const json& m = parent.at(key);
  const std::string where = parent.key_path(key);
  if (!m.is_object()) parent.fail(where, "expected an object keyed by cp size");
  std::map<int, T> out;
  for (auto it = m.begin(); it != m.end(); ++it)
    out[cp_key(parent, it.key(), where + "." + it.key())] = read_one(it.value(), where + "." + it.key());
  return out;
}

Status read_status(Obj& o, const std::string& key) {
  const std::string s = o.str(key);
  auto st = parse_status(s);
  if (!st) o.fail(o.key_path(key), "unknown status \"" + s + "\" (expected pass, fail, error or skipped)");
  return *st;
}

CheckResult read_check(const json& j, const std::string& path, const std::string& source) {
  Obj o(j, path, source);
  CheckResult c;
  c.name = o.str("name");
  c.status = read_status(o, "status");
  c.cp = static_cast<int>(o.integer("cp", 1));
  c.rank = o.opt_int("rank", 0);
  c.step = o.opt_int("step", 0);
  c.metric = o.str("metric");
  c.observed = o.measure("observed");
  c.threshold = o.measure("threshold");
  const std::string pol = o.str("policy");
  auto p = parse_policy(pol);
  if (!p) o.fail(o.key_path("policy"), "unknown policy \"" + pol + "\"");
  c.policy = *p;
  c.message = o.str("message");
  const json& d = o.at("details");
  if (!d.is_object()) o.fail(o.key_path("details"), "expected an object");
  c.details = d;
  o.finish();
  return c;
}

CacheCounters read_counters(const json& j, const std::string& path, const std::string& source) {
  Obj o(j, path, source);
  CacheCounters c;
  c.lookups = o.integer("lookups", 0);
  c.builds = o.integer("builds", 0);
  c.hits = o.integer("hits", 0);
  c.evictions = o.integer("evictions", 0);
  c.resets = o.integer("resets", 0);
  o.finish();
  return c;
}

CaseReport read_case(const json& j, const std::string& path, const std::string& source) {
  Obj o(j, path, source);
  CaseReport c;
  c.id = o.str("id");
  c.description = o.str("description");
  const json& cps = array_at(o, "cp_sizes");
  for (std::size_t i = 0; i < cps.size(); ++i)
    c.cp_sizes.push_back(static_cast<int>(o.as_int(cps[i], fmt::format("{}[{}]", o.key_path("cp_sizes"), i), 1)));
  c.dtype = o.str("dtype");
  const Status stored = read_status(o, "status");
  c.skip_reason = o.opt_str("skip_reason");
  c.error = o.opt_str("error");
  c.duration_s = o.number("duration_s");
  const json& checks = array_at(o, "checks");
  for (std::size_t i = 0; i < checks.size(); ++i)
    c.checks.push_back(read_check(checks[i], fmt::format("{}[{}]", o.key_path("checks"), i), source));
  c.trajectories = read_per_cp<Trajectory>(o, "trajectories", [&](const json& v, const std::string& where) {
    Obj t(v, where, source);
    Trajectory tr;
    tr.loss = read_series(t, "loss");
    tr.grad_norm = read_series(t, "grad_norm");
    tr.param_norm = read_series(t, "param_norm");
    t.finish();
    return tr;
  });
  c.block_mask_cache = read_per_cp<std::vector<std::vector<CacheCounters>>>(
      o, "block_mask_cache", [&](const json& v, const std::string& where) {
        if (!v.is_array()) o.fail(where, "expected an array over ranks");
        std::vector<std::vector<CacheCounters>> ranks;
        for (std::size_t r = 0; r < v.size(); ++r) {
          const std::string rw = fmt::format("{}[{}]", where, r);
          if (!v[r].is_array()) o.fail(rw, "expected an array over steps");
          std::vector<CacheCounters> steps;
          for (std::size_t s = 0; s < v[r].size(); ++s)
            steps.push_back(read_counters(v[r][s], fmt::format("{}[{}]", rw, s), source));
          ranks.push_back(std::move(steps));
        }
        return ranks;
      });
  c.ring = read_per_cp<RingTrace>(o, "ring", [&](const json& v, const std::string& where) {
    Obj t(v, where, source);
    RingTrace tr;
    const json& owners = array_at(t, "owners");
    for (std::size_t r = 0; r < owners.size(); ++r) {
      const std::string rw = fmt::format("{}[{}]", t.key_path("owners"), r);
      if (!owners[r].is_array()) t.fail(rw, "expected an array over ring steps");
      std::vector<int> row;
      for (std::size_t s = 0; s < owners[r].size(); ++s)
        row.push_back(static_cast<int>(t.as_int(owners[r][s], fmt::format("{}[{}]", rw, s), 0)));
      tr.owners.push_back(std::move(row));
    }
    if (t.has("owners_by_pass")) {
      const json& by = t.at("owners_by_pass");
      if (!by.is_object()) t.fail(t.key_path("owners_by_pass"), "expected an object of owners tables");
      for (auto it = by.begin(); it != by.end(); ++it) {
        std::vector<std::vector<int>> table;
        if (!it.value().is_array()) t.fail(t.key_path("owners_by_pass." + it.key()), "expected an array over ranks");
        for (auto& row : it.value()) {
          if (!row.is_array()) t.fail(t.key_path("owners_by_pass." + it.key()), "expected an array over ring steps");
          std::vector<int> r;
          for (auto& v : row) r.push_back(static_cast<int>(t.as_int(v, t.key_path("owners_by_pass." + it.key()), 0)));
          table.push_back(std::move(r));
        }
        tr.owners_by_pass[it.key()] = std::move(table);
      }
    }
    const json& passes = array_at(t, "passes");
    for (std::size_t i = 0; i < passes.size(); ++i) {
      Obj p(passes[i], fmt::format("{}[{}]", t.key_path("passes"), i), source);
      RingPass rp;
      rp.pass = p.str("pass");
      rp.comm_ops = p.integer("comm_ops", 0);
      rp.bytes = p.integer("bytes", 0);
      if (p.has("peak_chunks")) rp.peak_chunks = p.integer("peak_chunks", 1);
      p.finish();
      tr.passes.push_back(std::move(rp));
    }
    if (t.has("mode")) {
      tr.mode = t.str("mode");
      if (tr.mode != "collect" && tr.mode != "stream") t.fail(t.key_path("mode"), "expected \"collect\" or \"stream\"");
    }
    t.finish();
    return tr;
  });
  if (o.has("reference_cp")) c.reference_cp = int(o.integer("reference_cp", 1));
  for (const char* key : {"oracle_trajectory", "divergence_profile", "block_masks", "block_mask_cache_expected", "weights"})
    if (o.has(key)) c.page[key] = o.at(key);  // the page's data: the schema describes it, the page reads it
  if (o.has("performance"))
    c.performance = read_per_cp<Performance>(o, "performance", [&](const json& v, const std::string& where) {
      Obj t(v, where, source);
      Performance p;
      p.device = t.str("device");
      p.device_name = t.str("device_name");
      p.devices = int(t.integer("devices", 1));
      p.tokens_per_step = t.integer("tokens_per_step", 0);
      p.step_seconds = read_series(t, "step_seconds");
      read_series(t, "tokens_per_s_per_device");  // derived from the above; validated, not stored
      for (const char* key : {"peak_allocated_bytes", "peak_reserved_bytes"}) {
        const json& a = array_at(t, key);
        auto& out = std::string(key) == "peak_allocated_bytes" ? p.peak_allocated_bytes : p.peak_reserved_bytes;
        for (std::size_t i = 0; i < a.size(); ++i)
          out.push_back(a[i].is_null() ? std::nullopt
                                       : std::optional<int64_t>(t.as_int(a[i], fmt::format("{}.{}[{}]", where, key, i), 0)));
      }
      t.finish();
      return p;
    });
  o.finish();
  if (c.status() != stored)
    o.fail(o.key_path("status"), fmt::format("stored status \"{}\" disagrees with the checks (\"{}\")",
                                             to_string(stored), to_string(c.status())));
  return c;
}

}  // namespace

namespace {
ojson check_json(const CheckResult& c) {
  ojson o;
  o["name"] = c.name;
  o["status"] = to_string(c.status);
  o["cp"] = c.cp;
  o["rank"] = opt_int(c.rank);
  o["step"] = opt_int(c.step);
  o["metric"] = c.metric;
  put_measure(o, "observed", c.observed);
  put_measure(o, "threshold", c.threshold);
  o["policy"] = to_string(c.policy);
  o["message"] = c.message;
  o["details"] = c.details.is_object() ? ojson(c.details) : ojson{{"value", ojson(c.details)}};
  return o;
}
}  // namespace

ojson to_json(const CheckResult& c) { return sanitized(check_json(c)); }

ojson to_json(const Report& r) {
  ojson o;
  o["schema_version"] = r.schema_version;
  o["tool"] = ojson{{"name", r.tool.name}, {"version", r.tool.version}, {"git_sha", r.tool.git_sha}};
  const Environment& e = r.environment;
  o["environment"] = ojson{{"torch", e.torch},
                           {"cuda", opt_string(e.cuda)},
                           {"nccl", opt_string(e.nccl)},
                           {"device", e.device},
                           {"comm_backend", opt_string(e.comm_backend)},
                           {"determinism", e.determinism.is_object() ? ojson(e.determinism) : ojson::object()},
                           {"transformers", opt_string(e.transformers)},
                           {"planted_bug", opt_string(e.planted_bug)}};
  o["timestamp"] = opt_string(r.timestamp);
  o["status"] = to_string(r.status());
  o["error"] = opt_string(r.error);
  const Summary s = r.summary();
  o["summary"] = ojson{{"cases", s.cases},
                       {"passed", s.passed},
                       {"failed", s.failed},
                       {"errors", s.errors},
                       {"skipped", s.skipped},
                       {"checks_total", s.checks_total},
                       {"checks_passed", s.checks_passed},
                       {"checks_failed", s.checks_failed},
                       {"checks_errors", s.checks_errors},
                       {"checks_skipped", s.checks_skipped},
                       {"duration_s", duration(s.duration_s)}};
  ojson cases = ojson::array();
  for (const auto& c : r.cases) cases.push_back(case_json(c));
  o["cases"] = std::move(cases);
  return sanitized(o);
}

Report from_json(const json& j, const std::string& source) {
  Obj o(j, "", source);
  Report r;
  r.schema_version = o.str("schema_version");
  if (r.schema_version.rfind("1.", 0) != 0)
    o.fail("schema_version", "unsupported schema version \"" + r.schema_version + "\" (this build reads 1.x)");
  {
    Obj t(o.at("tool"), "tool", source);
    r.tool.name = t.str("name");
    r.tool.version = t.str("version");
    r.tool.git_sha = t.str("git_sha");
    t.finish();
  }
  {
    Obj e(o.at("environment"), "environment", source);
    r.environment.torch = e.str("torch");
    r.environment.cuda = e.opt_str("cuda");
    r.environment.nccl = e.opt_str("nccl");
    r.environment.device = e.str("device");
    r.environment.comm_backend = e.opt_str("comm_backend");
    const json& d = e.at("determinism");
    if (!d.is_object()) e.fail("environment.determinism", "expected an object");
    for (auto it = d.begin(); it != d.end(); ++it)
      if (!(it->is_boolean() || it->is_number() || it->is_string()))
        e.fail("environment.determinism." + it.key(), "expected a boolean, number or string");
    r.environment.determinism = d;
    r.environment.transformers = e.opt_str("transformers");
    if (e.has("planted_bug")) r.environment.planted_bug = e.opt_str("planted_bug");  // absent in older reports
    e.finish();
  }
  r.timestamp = o.opt_str("timestamp");
  const Status stored = read_status(o, "status");
  r.error = o.opt_str("error");
  const json& cases = array_at(o, "cases");
  for (std::size_t i = 0; i < cases.size(); ++i)
    r.cases.push_back(read_case(cases[i], fmt::format("cases[{}]", i), source));
  {
    Obj s(o.at("summary"), "summary", source);
    r.duration_s = s.number("duration_s");
    const Summary want = r.summary();
    auto expect = [&](const char* key, int v) {
      const std::int64_t got = s.integer(key, 0);
      if (got != v) s.fail(std::string("summary.") + key, fmt::format("is {} but the cases give {}", got, v));
    };
    expect("cases", want.cases);
    expect("passed", want.passed);
    expect("failed", want.failed);
    expect("errors", want.errors);
    expect("skipped", want.skipped);
    expect("checks_total", want.checks_total);
    expect("checks_passed", want.checks_passed);
    expect("checks_failed", want.checks_failed);
    expect("checks_errors", want.checks_errors);
    expect("checks_skipped", want.checks_skipped);
    s.finish();
  }
  o.finish();
  if (r.status() != stored)
    o.fail("status", fmt::format("stored status \"{}\" disagrees with the cases (\"{}\")", to_string(stored),
                                 to_string(r.status())));
  return r;
}

void write_report_json(const std::string& path, const Report& r) {
  write_file_atomically(path, json_text(to_json(r)));
}

Report read_report_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io::InputError(path, "", std::string("cannot open: ") + std::strerror(errno));
  return from_json(io::parse_input_json(in, path, ""), path);
}

nlohmann::json series_json(const std::vector<double>& values) {
  nlohmann::json a = nlohmann::json::array();
  for (double v : values) a.push_back(std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nonfinite_tag(v)));
  return a;
}

}  // namespace cpharness::report
