// report.xml: JUnit XML in the gtest/xunit2 layout, for CI systems.
//
//   <testsuites name="cpharness" tests failures errors skipped time timestamp>
//     <testsuite name=CASE_ID tests failures errors skipped time>
//       <properties> description, dtype, cp_sizes </properties>
//       <testcase name="CHECK[cp=N]" | "CHECK[cp=N,rank=R]" | "CHECK[cp=N,rank=R,step=S]" classname="cpharness.CASE_ID" time="0">
//         <properties> observed, threshold, metric, policy, cp, rank?, step? </properties>
//         <failure message="observed X > allowed Y (policy)" type="fail">details (JSON)</failure>
//         | <error message=... type="error">...</error> | <skipped message=REASON/>
//       </testcase>
//   ...
// A case skipped or errored as a whole (no check results say why) gets one testcase named "case" carrying the
// <skipped>/<error>; a report-level error gets a testsuite "cpharness" with a testcase "run" carrying the <error>.
// Testcase names repeated within a suite get " #2", " #3", ... appended so no result is merged away.
// All text is escaped: & < > " ' as entities, tab/newline/CR in attributes as character references, other
// control characters and invalid UTF-8 replaced by U+FFFD (XML 1.0 cannot carry them at all).
#pragma once

#include <string>
#include <string_view>

#include "harness/report/report.h"

namespace cpharness::report {

std::string to_junit_xml(const Report& r);

// Writes to_junit_xml(r) atomically; throws io::InputError naming `path` when it cannot be written.
void write_junit_xml(const std::string& path, const Report& r);

// "train.loss_parity[cp=2]", "cache.build_count[cp=2,rank=1,step=0]".
std::string junit_testcase_name(const CheckResult& c);

// XML-escapes `s` (see above); in_attribute also encodes tab and newline as character references.
std::string xml_escape(std::string_view s, bool in_attribute = true);

}  // namespace cpharness::report
