"""Tests of reports/render_html.py: the page of a default-suite-sized report (passing and failing), the schema of
the optional fields it reads, graceful absence of those fields, and bad input.

    cd reports/tests && /usr/bin/python3 -m unittest -v test_render_html

Registered in CTest as report_html_render (reports/CMakeLists.txt). Besides the synthetic fixtures, it renders
reports/out/report.json when ci/harness.sh has written one (CPHARNESS_REPORT_JSON names another).
"""

import html.parser
import json
import os
import re
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPORTS = os.path.dirname(HERE)
SCRIPT = os.path.join(REPORTS, "render_html.py")
SCHEMA = os.path.join(REPORTS, "schema", "report.schema.json")
sys.path.insert(0, HERE)
sys.path.insert(0, REPORTS)

import fixtures  # noqa: E402

SECTIONS = ("trajectories", "divergence", "block-masks", "ring", "cache", "performance")


def run_script(*args, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300, env=env)


def render_to(tmp, name, report):
    src = os.path.join(tmp, name + ".json")
    out = os.path.join(tmp, name + ".html")
    with open(src, "w") as f:
        json.dump(report, f)
    r = run_script(src, "-o", out)
    if r.returncode != 0:
        raise AssertionError(f"render of {name} failed ({r.returncode}): {r.stderr}")
    with open(out, encoding="utf-8") as f:
        return f.read()


class Page(html.parser.HTMLParser):
    """The structure the tests look at: sections by case, figures and what they contain, check rows, ids, links."""

    def __init__(self, text):
        super().__init__()
        self.ids, self.links, self.scripts_with_src = [], [], []
        self.cases = []            # (case id, status)
        self.sections = {}         # case id -> [data-section ...]
        self.figures = []          # (case id, kind, has <svg>)
        self.rows = []             # (data-status, data-name, data-case)
        self.top_sections = []
        self._case = None
        self._figure = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        for key in ("src", "href", "xlink:href"):
            if key in a:
                self.links.append(a[key])
        if tag == "script" and "src" in a:
            self.scripts_with_src.append(a["src"])
        if tag == "section" and "case" in (a.get("class") or "").split():
            self._case = a["data-case"]
            self.cases.append((a["data-case"], a.get("data-status")))
            self.sections[self._case] = []
        elif tag == "section" and a.get("data-section"):
            self.top_sections.append(a["data-section"])
            self._case = None
        if tag == "div" and a.get("data-section") and self._case:
            self.sections[self._case].append(a["data-section"])
        if tag == "figure":
            self._figure = [self._case, a.get("data-figure"), False]
            self.figures.append(self._figure)
        if tag == "svg" and self._figure is not None:
            self._figure[2] = True
        if tag == "tr" and "check" in (a.get("class") or "").split():
            self.rows.append((a.get("data-status"), a.get("data-name"), a.get("data-case")))

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None


class RenderTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="render-html-test-")
        t = cls.tmp.name
        cls.passing = fixtures.default_suite_report()
        cls.failing = fixtures.default_suite_report(failing=True)
        cls.pass_html = render_to(t, "pass", cls.passing)
        cls.fail_html = render_to(t, "fail", cls.failing)
        cls.legacy_html = render_to(t, "legacy", fixtures.legacy_report())
        cls.bare_html = render_to(t, "bare", fixtures.bare_report())
        cls.pages = {k: Page(getattr(cls, k + "_html")) for k in ("pass", "fail", "legacy", "bare")}

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    # -- the fixtures are what cpharness would write -------------------------------------------------------------

    def test_fixtures_validate_against_schema(self):
        try:
            import jsonschema
        except ImportError:
            self.skipTest("python3-jsonschema is not installed (ci/setup.sh installs it)")
        with open(SCHEMA) as f:
            schema = json.load(f)
        jsonschema.Draft202012Validator.check_schema(schema)
        v = jsonschema.Draft202012Validator(schema)
        for name, doc in (("passing", self.passing), ("failing", self.failing), ("legacy", fixtures.legacy_report()),
                          ("bare", fixtures.bare_report())):
            errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]
            self.assertEqual(errors, [], name)
        self.assertEqual(self.passing["status"], "pass")
        self.assertEqual(self.failing["status"], "fail")
        self.assertGreaterEqual(self.passing["summary"]["checks_total"], 250)

    def test_schema_stays_strict_for_new_fields(self):
        try:
            import jsonschema
        except ImportError:
            self.skipTest("python3-jsonschema is not installed (ci/setup.sh installs it)")
        with open(SCHEMA) as f:
            v = jsonschema.Draft202012Validator(json.load(f))

        def mutated(fn):
            doc = json.loads(json.dumps(self.passing))
            fn(doc["cases"][1])
            return doc

        bad = {
            "tile_char": lambda c: c["block_masks"]["2"][0]["tiles"].__setitem__(0, "FX" + "E" * 4),
            "too_many_q_blocks": lambda c: c["block_masks"]["2"][0].__setitem__("q_blocks", 65),
            "too_many_grids": lambda c: c["block_masks"].__setitem__("2", c["block_masks"]["2"] * 9),
            "profile_unknown_key": lambda c: c["divergence_profile"]["2"]["hidden"][0].__setitem__("layer", 0),
            "profile_rel_negative": lambda c: c["divergence_profile"]["2"]["grads"][0].__setitem__("rel", -1.0),
            "profile_missing_policy": lambda c: c["divergence_profile"]["2"].pop("policy"),
            "owners_by_pass_bad": lambda c: c["ring"]["2"]["owners_by_pass"].__setitem__("forward", [[-1]]),
            "expected_float": lambda c: c["block_mask_cache_expected"]["2"].__setitem__("builds", 4.5),
            "oracle_missing_dtype": lambda c: c["oracle_trajectory"].pop("dtype") if "oracle_trajectory" in c
            else c.__setitem__("oracle_trajectory", {"loss": [], "grad_norm": [], "param_norm": []}),
            "case_unknown_key": lambda c: c.__setitem__("layer_profile", {}),
        }
        for name, fn in bad.items():
            with self.subTest(name):
                self.assertTrue(list(v.iter_errors(mutated(fn))), f"the schema accepted {name}")

    # -- structure -----------------------------------------------------------------------------------------------

    def test_summary_then_cases_then_checks(self):
        for name in ("pass", "fail"):
            page = self.pages[name]
            self.assertEqual(page.top_sections, ["summary", "checks"], name)
            self.assertEqual(sorted(c for c, _ in page.cases), sorted(c["id"] for c in self.passing["cases"]))
        html_text = self.fail_html
        self.assertLess(html_text.index('id="summary"'), html_text.index('class="case"'))
        self.assertLess(html_text.rindex('class="case"'), html_text.index('id="checks"'))

    def test_every_case_has_every_section(self):
        for name, page in self.pages.items():
            for case, sections in page.sections.items():
                self.assertEqual(sections, list(SECTIONS), f"{name}: {case}")

    def test_every_figure_is_inline_svg(self):
        for name, page in self.pages.items():
            for case, kind, has_svg in page.figures:
                self.assertTrue(has_svg, f"{name}: {case} {kind} figure has no inline <svg>")

    def test_performance_table_shows_every_run_with_device_memory(self):
        html = self.pass_html
        for case in self.passing["cases"]:
            for cp in case["performance"]:
                self.assertIn(f"<tr><td>{cp}</td>", html, cp)
        self.assertIn("3.00 GiB", html)   # the candidates' peak allocated bytes
        self.assertIn("NVIDIA H200", html)
        self.assertIn("&ndash;", html)    # the CPU reference has no device memory

    def test_figure_counts(self):
        per_cp = sum(len(c["cp_sizes"]) for c in self.passing["cases"])
        layer_types = {c["id"]: {g["layer_type"] for gs in c["block_masks"].values() for g in gs}
                       for c in self.passing["cases"]}
        grids = sum(len(lt) * len(c["cp_sizes"]) for c, lt in
                    zip(self.passing["cases"], layer_types.values()))
        for name in ("pass", "fail"):
            kinds = [k for _, k, _ in self.pages[name].figures]
            self.assertEqual(kinds.count("trajectories"), len(self.passing["cases"]), name)
            self.assertEqual(kinds.count("divergence"), per_cp, name)
            self.assertEqual(kinds.count("ring"), per_cp, name)
            self.assertEqual(kinds.count("cache"), per_cp, name)
            self.assertEqual(kinds.count("block-masks"), grids, name)
        # Every tile grid of the report is drawn: one <svg class="tiles"> per (layer type, rank, chunk).
        expected_tiles = sum(len(gs) for c in self.passing["cases"] for gs in c["block_masks"].values())
        self.assertEqual(self.pass_html.count('<svg class="tiles"'), expected_tiles)

    def test_ids_unique_and_svg_references_resolve(self):
        for name, page in self.pages.items():
            dup = {i for i in page.ids if page.ids.count(i) > 1}
            self.assertEqual(dup, set(), name)
            text = getattr(self, name + "_html")
            ids = set(page.ids)
            refs = set(re.findall(r'url\(#([^)]+)\)', text)) | {l[1:] for l in page.links if l.startswith("#")
                                                                 and not l.startswith("#filter:")}
            self.assertEqual(refs - ids, set(), f"{name}: references to missing ids")

    def test_self_contained(self):
        for name, page in self.pages.items():
            external = [l for l in page.links if re.match(r"^\s*(https?:)?//", l, re.I)]
            self.assertEqual(external, [], name)
            self.assertEqual(page.scripts_with_src, [], name)
            text = getattr(self, name + "_html")
            self.assertNotRegex(text, r"<link\b", name)
            self.assertNotRegex(text, r"url\(\s*['\"]?(https?:)?//", name)
            self.assertNotRegex(text, r"@import", name)
            self.assertNotIn("<?xml", text, name)
            self.assertNotIn("<!DOCTYPE svg", text, name)

    # -- content -------------------------------------------------------------------------------------------------

    def test_failing_check_first(self):
        rows = self.pages["fail"].rows
        self.assertEqual(len(rows), self.failing["summary"]["checks_total"])
        statuses = [s for s, _, _ in rows]
        n_fail = self.failing["summary"]["checks_failed"]
        self.assertGreater(n_fail, 0)
        self.assertEqual(statuses[:n_fail], ["fail"] * n_fail)
        self.assertNotIn("fail", statuses[n_fail:])
        self.assertEqual(rows[0][1:], ("train.grad_norm_parity", fixtures.FAIL_CASE))
        # The failing case comes first among the case sections too.
        self.assertEqual(self.pages["fail"].cases[0], (fixtures.FAIL_CASE, "fail"))

    def test_summary_names_first_failure_and_divergence(self):
        text = self.fail_html
        block = text[text.index('id="first-failure"'):text.index("</div>", text.index('id="first-failure"'))]
        self.assertIn("train.grad_norm_parity[cp=4,step=1]", block)
        self.assertIn("observed 0.00041 &gt; allowed 1e-05 (fp32_relative)", block)
        self.assertIn("first divergence: <b>gradient layers.13.self_attn.q_proj.weight (layer 13)", block)
        self.assertNotIn('id="first-failure"', self.pass_html)
        self.assertIn(">pass</span>", self.pass_html[:self.pass_html.index('id="summary"')])

    def test_divergence_caption_names_first_tensor(self):
        self.assertIn("First out of tolerance: <b>layers.13.self_attn.q_proj.weight</b>", self.fail_html)
        self.assertNotIn("First out of tolerance", self.pass_html)

    def test_filter_controls_inline(self):
        for name in ("pass", "fail"):
            text = getattr(self, name + "_html")
            for control in ('id="f-status"', 'id="f-name"', 'id="f-case"', 'id="checks-table"'):
                self.assertIn(control, text, name)
            self.assertRegex(text, r"<script>[^<]*getElementById\('checks-table'\)", name)

    def test_absent_data_is_noted_not_fatal(self):
        legacy, bare = self.legacy_html, self.bare_html
        n = len(self.passing["cases"])
        self.assertEqual(legacy.count("divergence profile (per-layer relative error at step 0): not in this report"), n)
        self.assertEqual(legacy.count("block-mask tile grids: not in this report"), n)
        self.assertIn("this report records one owners table, shown as the forward pass", legacy)
        kinds = [k for _, k, _ in self.pages["legacy"].figures]
        self.assertEqual(kinds.count("trajectories"), n)
        self.assertEqual(kinds.count("cache"), sum(len(c["cp_sizes"]) for c in self.passing["cases"]))
        # Expected cache counts come from the cache checks' details where the report has no expected block.
        self.assertIn("every counter as expected", legacy)
        for phrase in ("trajectories: not in this report", "ring trace: not in this report",
                       "block-mask cache counters: not in this report"):
            self.assertEqual(bare.count(phrase), n, phrase)
        self.assertEqual(self.pages["bare"].figures, [])

    def test_nonfinite_values(self):
        doc = fixtures.default_suite_report(failing=True)
        case = doc["cases"][2]
        case["trajectories"]["4"]["loss"][2] = "nan"
        case["divergence_profile"]["4"]["hidden"][5]["rel"] = "inf"
        for c in case["checks"]:
            if c["name"] == "train.loss_parity" and c["cp"] == 4 and c["step"] == 2:
                c.update(status="fail", observed=None, observed_nonfinite="nan",
                         message="observed nan is not finite; allowed 1e-05 (fp32_relative)")
        fixtures.finalize(doc)
        with tempfile.TemporaryDirectory() as t:
            text = render_to(t, "nonfinite", doc)
        page = Page(text)
        self.assertTrue(all(has for _, _, has in page.figures))
        self.assertIn('<td class="n">nan</td>', text)

    def test_thresholds_up_to_the_largest_double_are_drawn(self):
        # A case may allow any finite tolerance; 1e308 overflowed the log axis (OverflowError, no page).
        doc = fixtures.default_suite_report(failing=False)
        case = doc["cases"][2]
        for entry in case["divergence_profile"]["4"]["hidden"]:
            entry["threshold"] = 1e308
        for c in case["checks"]:
            if c["name"] == "train.loss_parity" and c["cp"] == 4:
                c.update(threshold=1e308)
        fixtures.finalize(doc)
        with tempfile.TemporaryDirectory() as t:
            text = render_to(t, "huge", doc)
        self.assertTrue(all(has for _, _, has in Page(text).figures))

    def test_report_from_ci_harness_if_present(self):
        path = os.environ.get("CPHARNESS_REPORT_JSON") or os.path.join(REPORTS, "out", "report.json")
        if not os.path.exists(path):
            self.skipTest(f"{path} not present (ci/harness.sh writes it)")
        with open(path) as f:
            report = json.load(f)
        with tempfile.TemporaryDirectory() as t:
            out = os.path.join(t, "report.html")
            r = run_script(path, "-o", out)
            self.assertEqual(r.returncode, 0, r.stderr)
            with open(out, encoding="utf-8") as f:
                page = Page(f.read())
        self.assertEqual(len(page.cases), len(report["cases"]))
        for case, sections in page.sections.items():
            self.assertEqual(sections, list(SECTIONS), case)
        self.assertTrue(all(has for _, _, has in page.figures))

    # -- bad input -----------------------------------------------------------------------------------------------

    def test_bad_input_exits_2_naming_file_and_reason(self):
        with tempfile.TemporaryDirectory() as t:
            out = os.path.join(t, "out.html")
            missing = os.path.join(t, "nope.json")
            r = run_script(missing, "-o", out)
            self.assertEqual(r.returncode, 2)
            self.assertIn(f"{missing}: cannot read", r.stderr)

            def case(name, text, needle):
                p = os.path.join(t, name + ".json")
                with open(p, "w") as f:
                    f.write(text)
                r = run_script(p, "-o", out)
                self.assertEqual(r.returncode, 2, name)
                lines = r.stderr.strip().splitlines()
                self.assertEqual(len(lines), 1, r.stderr)
                self.assertIn(p, lines[0], name)
                self.assertIn(needle, lines[0], name)

            case("truncated", '{"status": "pass", "cases": [', "invalid JSON")
            case("nan", '{"status": NaN}', "invalid JSON")
            case("array", "[]", "<root>: expected an object")
            doc = fixtures.legacy_report()
            del doc["cases"][1]["id"]
            case("no_id", json.dumps(doc), "cases[1].id: missing required key")
            doc = fixtures.legacy_report()
            doc["cases"][0]["checks"][3]["cp"] = "2"
            case("cp_string", json.dumps(doc), "cases[0].checks[3].cp: expected int, got str")
            doc = fixtures.legacy_report()
            del doc["summary"]
            case("no_summary", json.dumps(doc), "summary: missing required key")
            self.assertFalse(os.path.exists(out))
            # An output directory that does not exist: exit 2, nothing written.
            ok = os.path.join(t, "ok.json")
            with open(ok, "w") as f:
                json.dump(fixtures.bare_report(), f)
            r = run_script(ok, "-o", os.path.join(t, "no", "such", "dir.html"))
            self.assertEqual(r.returncode, 2)
            self.assertIn("cannot write", r.stderr)

    def test_missing_matplotlib_is_a_clear_error(self):
        with tempfile.TemporaryDirectory() as t:
            os.makedirs(os.path.join(t, "matplotlib"))
            with open(os.path.join(t, "matplotlib", "__init__.py"), "w") as f:
                f.write("raise ImportError('No module named matplotlib')\n")
            src = os.path.join(t, "r.json")
            with open(src, "w") as f:
                json.dump(fixtures.bare_report(), f)
            env = dict(os.environ, PYTHONPATH=t)
            r = run_script(src, "-o", os.path.join(t, "r.html"), env=env)
            self.assertEqual(r.returncode, 2)
            self.assertIn("matplotlib is missing", r.stderr)
            self.assertIn("python3-matplotlib", r.stderr)
            self.assertFalse(os.path.exists(os.path.join(t, "r.html")))


if __name__ == "__main__":
    unittest.main()
