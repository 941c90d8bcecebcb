#include "harness/report/junit.h"

#include <cmath>
#include <cstdint>
#include <map>
#include <vector>

#include <fmt/format.h>

namespace cpharness::report {

namespace {

constexpr const char* kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Length of the valid UTF-8 sequence at s[i] whose code point XML 1.0 allows (>= 0x80 only), or 0.
std::size_t valid_utf8_char(std::string_view s, std::size_t i) {
  const auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[i + k]); };
  const unsigned char c = b(0);
  std::size_t len;
  std::uint32_t cp;
  if (c >= 0xC2 && c <= 0xDF) len = 2, cp = c & 0x1F;
  else if (c >= 0xE0 && c <= 0xEF) len = 3, cp = c & 0x0F;
  else if (c >= 0xF0 && c <= 0xF4) len = 4, cp = c & 0x07;
  else return 0;
  if (i + len > s.size()) return 0;
  for (std::size_t k = 1; k < len; ++k) {
    if ((b(k) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (b(k) & 0x3F);
  }
  if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF))) return 0;  // overlong / range
  if (cp >= 0xD800 && cp <= 0xDFFF) return 0;                                                  // surrogates
  if (cp == 0xFFFE || cp == 0xFFFF) return 0;                                                  // not XML chars
  return len;
}

std::string num(double v) { return fmt::format("{}", v); }
std::string secs(double v) { return fmt::format("{:.3f}", std::isfinite(v) && v > 0 ? v : 0.0); }

struct Counts {
  int tests = 0, failures = 0, errors = 0, skipped = 0;
  void add(Status s) {
    ++tests;
    failures += s == Status::Fail;
    errors += s == Status::Error;
    skipped += s == Status::Skipped;
  }
};

std::string counts_attrs(const Counts& c) {
  return fmt::format("tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\"", c.tests, c.failures, c.errors,
                     c.skipped);
}

void property(std::string& out, const char* indent, std::string_view name, std::string_view value) {
  out += fmt::format("{}<property name=\"{}\" value=\"{}\"/>\n", indent, xml_escape(name), xml_escape(value));
}

// The outcome element of a testcase (nothing for a pass).
void outcome(std::string& out, Status s, std::string_view message, std::string_view body) {
  constexpr const char* in = "      ";
  switch (s) {
    case Status::Pass: return;
    case Status::Skipped:
      out += fmt::format("{}<skipped message=\"{}\"/>\n", in, xml_escape(message));
      return;
    case Status::Fail:
    case Status::Error: {
      const char* tag = s == Status::Fail ? "failure" : "error";
      out += fmt::format("{}<{} message=\"{}\" type=\"{}\">{}</{}>\n", in, tag, xml_escape(message),
                         to_string(s), xml_escape(body, false), tag);
      return;
    }
  }
}

struct Testcase {
  Status status;
  std::string xml;  // the whole <testcase> element
};

// Gives repeated testcase names within one suite " #2", " #3", ... so that no CI tool merges them.
class Names {
 public:
  std::string unique(const std::string& name) {
    const int k = ++seen_[name];
    return k == 1 ? name : name + " #" + std::to_string(k);
  }

 private:
  std::map<std::string, int> seen_;
};

std::string default_message(const CheckResult& c) {
  if (c.status == Status::Fail)
    return fmt::format("observed {} {} {} ({})", num(c.observed), c.policy == Policy::Count ? "!= expected" : "> allowed",
                       num(c.threshold), to_string(c.policy));
  return std::string(to_string(c.status));
}

std::string check_testcase(const std::string& name, const std::string& classname, const CheckResult& c) {
  std::string x = fmt::format("    <testcase name=\"{}\" classname=\"{}\" time=\"0.000\">\n", xml_escape(name),
                              xml_escape(classname));
  x += "      <properties>\n";
  constexpr const char* in = "        ";
  property(x, in, "observed", num(c.observed));
  property(x, in, "threshold", num(c.threshold));
  property(x, in, "metric", c.metric);
  property(x, in, "policy", to_string(c.policy));
  property(x, in, "cp", std::to_string(c.cp));
  if (c.rank) property(x, in, "rank", std::to_string(*c.rank));
  if (c.step) property(x, in, "step", std::to_string(*c.step));
  x += "      </properties>\n";
  const std::string message = c.message.empty() ? default_message(c) : c.message;
  std::string body = message;
  if (c.details.is_object() && !c.details.empty())
    body += "\n" + c.details.dump(2, ' ', false, nlohmann::json::error_handler_t::replace);
  outcome(x, c.status, message, body);
  x += "    </testcase>\n";
  return x;
}

std::string plain_testcase(const std::string& name, const std::string& classname, Status s,
                           const std::string& message) {
  std::string x = fmt::format("    <testcase name=\"{}\" classname=\"{}\" time=\"0.000\">\n", xml_escape(name),
                              xml_escape(classname));
  outcome(x, s, message, message);
  x += "    </testcase>\n";
  return x;
}

std::string suite(const std::string& name, double duration, const std::vector<std::pair<std::string, std::string>>& props,
                  const std::vector<Testcase>& cases) {
  Counts counts;
  for (const auto& t : cases) counts.add(t.status);
  std::string x = fmt::format("  <testsuite name=\"{}\" {} time=\"{}\">\n", xml_escape(name), counts_attrs(counts),
                              secs(duration));
  if (!props.empty()) {
    x += "    <properties>\n";
    for (const auto& [k, v] : props) property(x, "      ", k, v);
    x += "    </properties>\n";
  }
  for (const auto& t : cases) x += t.xml;
  x += "  </testsuite>\n";
  return x;
}

}  // namespace

std::string xml_escape(std::string_view s, bool in_attribute) {
  std::string out;
  out.reserve(s.size() + s.size() / 8);
  for (std::size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      switch (c) {
        case '&': out += "&amp;"; break;
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '"': out += "&quot;"; break;
        case '\'': out += "&apos;"; break;
        case '\t': out += in_attribute ? "&#9;" : "\t"; break;
        case '\n': out += in_attribute ? "&#10;" : "\n"; break;
        case '\r': out += "&#13;"; break;
        default:
          if (c < 0x20 || c == 0x7F) out += kReplacement;  // XML 1.0 cannot carry C0 controls, even as references
          else out += static_cast<char>(c);
      }
      ++i;
      continue;
    }
    const std::size_t len = valid_utf8_char(s, i);
    if (len == 0) {
      out += kReplacement;
      ++i;
    } else {
      out.append(s.substr(i, len));
      i += len;
    }
  }
  return out;
}

std::string junit_testcase_name(const CheckResult& c) {
  std::string n = fmt::format("{}[cp={}", c.name, c.cp);
  if (c.rank) n += fmt::format(",rank={}", *c.rank);
  if (c.step) n += fmt::format(",step={}", *c.step);
  return n + "]";
}

std::string to_junit_xml(const Report& r) {
  Counts total;
  std::string suites;
  auto add_suite = [&](const std::string& name, double duration,
                       const std::vector<std::pair<std::string, std::string>>& props, std::vector<Testcase> tcs) {
    for (const auto& t : tcs) total.add(t.status);
    suites += suite(name, duration, props, std::move(tcs));
  };
  if (r.error)
    add_suite("cpharness", 0.0, {}, {{Status::Error, plain_testcase("run", "cpharness.run", Status::Error, *r.error)}});
  for (const auto& c : r.cases) {
    const std::string classname = "cpharness." + c.id;
    Names names;
    std::vector<Testcase> tcs;
    const Status cs = c.status();
    // A case skipped or errored as a whole (not through a check): one testcase "case" says why.
    if (cs == Status::Skipped && c.skip_reason) {
      tcs.push_back({cs, plain_testcase(names.unique("case"), classname, cs, *c.skip_reason)});
    } else if (cs == Status::Error && (c.error || c.checks.empty())) {
      tcs.push_back({cs, plain_testcase(names.unique("case"), classname, cs, *c.error_reason())});
    }
    for (const auto& k : c.checks)
      tcs.push_back({k.status, check_testcase(names.unique(junit_testcase_name(k)), classname, k)});
    std::string cps;
    for (std::size_t i = 0; i < c.cp_sizes.size(); ++i) cps += (i ? "," : "") + std::to_string(c.cp_sizes[i]);
    add_suite(c.id, c.duration_s,
              {{"description", c.description}, {"dtype", c.dtype}, {"cp_sizes", cps},
               {"status", std::string(to_string(cs))}},
              std::move(tcs));
  }
  double duration = r.duration_s;
  if (!(duration > 0))
    for (const auto& c : r.cases) duration += std::isfinite(c.duration_s) && c.duration_s > 0 ? c.duration_s : 0.0;
  std::string x = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  x += fmt::format("<testsuites name=\"cpharness\" {} time=\"{}\"", counts_attrs(total), secs(duration));
  if (r.timestamp) x += fmt::format(" timestamp=\"{}\"", xml_escape(*r.timestamp));
  x += ">\n";
  x += suites;
  x += "</testsuites>\n";
  return x;
}

void write_junit_xml(const std::string& path, const Report& r) { write_file_atomically(path, to_junit_xml(r)); }

}  // namespace cpharness::report
