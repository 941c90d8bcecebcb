// report.json: the machine-readable report, described by reports/schema/report.schema.json (draft 2020-12).
//
// Encoding rules (JSON has no NaN/Inf):
//  - a check's observed / threshold that is not finite is written as null plus "observed_nonfinite" /
//    "threshold_nonfinite" = "nan" | "inf" | "-inf";
//  - a non-finite value in a numeric series (trajectories) is written as the string "nan" | "inf" | "-inf";
//  - statuses and the summary are derived from the data when written; reading checks they still agree;
//  - invalid UTF-8 in any string is replaced by U+FFFD, so to_json(r).dump() never throws.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "harness/report/report.h"

namespace cpharness::report {

nlohmann::ordered_json to_json(const Report& r);
nlohmann::ordered_json to_json(const CheckResult& c);

// Parses a report written by to_json. Strict: a missing or unknown key, a wrong type, an unknown enum value,
// a schema_version of another major version, or a stored status/summary that disagrees with the data throws
// io::InputError(source, "<key path, e.g. cases[1].checks[0].observed>", reason).
Report from_json(const nlohmann::json& j, const std::string& source = "<report json>");

// Writes to_json(r) (2-space indented, trailing newline) atomically: never a partial file, no temp left behind.
// Throws io::InputError naming `path` when it cannot be written (e.g. its directory does not exist).
void write_report_json(const std::string& path, const Report& r);

// The text of a JSON document written for people and tools (2-space indented, trailing newline). Strings read from
// inputs (a golden's provenance, an error naming a tensor) may hold bytes that are not UTF-8: they are written as
// U+FFFD, where a plain dump threw and the report was lost.
template <class Json>
std::string json_text(const Json& j) {
  return j.dump(2, ' ', false, Json::error_handler_t::replace) + "\n";
}

// Reads and parses `path`; throws io::InputError for a missing file, malformed JSON or a bad report.
Report read_report_json(const std::string& path);

// A numeric series as report.json writes it: numbers, and "nan" / "inf" / "-inf" where a value is not finite.
nlohmann::json series_json(const std::vector<double>& values);

}  // namespace cpharness::report
