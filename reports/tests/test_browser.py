"""The rendered page in a real browser: headless Chromium loads the failing report's page from a file, logs no
console message (no script error), runs the filter script, and its screenshot is not blank.

    cd reports/tests && /usr/bin/python3 test_browser.py     (CTest: report_html_browser)

Where no Chromium is installed (Debian package `chromium`; ci/setup.sh installs it) every test is skipped with the
reason; run as a script it then exits 77, which CTest reports as skipped (SKIP_RETURN_CODE 77).
CPHARNESS_CHROMIUM names another browser binary.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPORTS = os.path.dirname(HERE)
SCRIPT = os.path.join(REPORTS, "render_html.py")
sys.path.insert(0, HERE)

import fixtures  # noqa: E402

SKIP = 77


def find_chromium():
    env = os.environ.get("CPHARNESS_CHROMIUM")
    if env:
        return env if shutil.which(env) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = find_chromium()
NO_CHROMIUM = "no Chromium on this machine (Debian: apt-get install chromium; ci/setup.sh installs it)"


def chromium(*args, timeout=180):
    """Runs headless Chromium; returns (stdout, the console messages it logged, stderr)."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        r = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                            "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
                            "--enable-logging=stderr", "--v=0", *args],
                           capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    console = [line for line in r.stderr.splitlines() if re.search(r":CONSOLE[:(]", line) or "Uncaught" in line]
    return r, console


def png_stats(path):
    """(height, width, pixel standard deviation, fraction of pixels that differ from the most common colour)."""
    import numpy as np
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    a = mpimg.imread(path)[:, :, :3]
    flat = (a * 255).astype(np.uint8).reshape(-1, 3)
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    differs = float(np.any(flat != background, axis=1).mean())
    return a.shape[0], a.shape[1], float(a.std()), differs


@unittest.skipIf(CHROMIUM is None, NO_CHROMIUM)
class BrowserTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="render-html-browser-")
        src = os.path.join(cls.tmp.name, "report.json")
        cls.page = os.path.join(cls.tmp.name, "report.html")
        with open(src, "w") as f:
            json.dump(fixtures.default_suite_report(failing=True), f)
        r = subprocess.run([sys.executable, SCRIPT, src, "-o", cls.page], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise AssertionError(f"render failed ({r.returncode}): {r.stderr}")
        cls.url = "file://" + cls.page

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_console_detector_sees_a_script_error(self):
        # The check below is only worth something if a broken page is caught.
        broken = os.path.join(self.tmp.name, "broken.html")
        with open(broken, "w") as f:
            f.write("<!DOCTYPE html><html><body><p>x</p><script>notDefined();</script></body></html>")
        _, console = chromium("--dump-dom", "file://" + broken)
        self.assertTrue(any("notDefined" in line for line in console), console)

    def test_blank_detector_sees_a_blank_page(self):
        blank = os.path.join(self.tmp.name, "blank.html")
        with open(blank, "w") as f:
            f.write("<!DOCTYPE html><html><body></body></html>")
        shot = os.path.join(self.tmp.name, "blank.png")
        chromium(f"--screenshot={shot}", "--window-size=640,480", "file://" + blank)
        _, _, std, differs = png_stats(shot)
        self.assertLess(differs, 0.01)

    def test_loads_without_console_messages_and_screenshot_not_blank(self):
        shot = os.path.join(self.tmp.name, "shot.png")
        r, console = chromium(f"--screenshot={shot}", "--window-size=1280,2000", self.url)
        self.assertEqual(console, [], "the page logged to the console")
        self.assertTrue(os.path.exists(shot), r.stderr[-2000:])
        h, w, std, differs = png_stats(shot)
        self.assertEqual((h, w), (2000, 1280))
        self.assertGreater(std, 0.05, "screenshot is nearly uniform")
        self.assertGreater(differs, 0.05, "screenshot is mostly background")

    def test_filter_script_runs(self):
        total = fixtures.default_suite_report(failing=True)["summary"]
        dom, console = chromium("--dump-dom", self.url)
        self.assertEqual(console, [])
        self.assertIn(f'id="f-count" data-rows="{total["checks_total"]}">{total["checks_total"]} of '
                      f'{total["checks_total"]} rows<', dom.stdout)
        # A link can preset the filter: only the failing rows stay visible.
        dom, console = chromium("--dump-dom", self.url + "#filter:status=failing")
        self.assertEqual(console, [])
        self.assertIn(f'>{total["checks_failed"]} of {total["checks_total"]} rows<', dom.stdout)
        rows = re.findall(r'<tr class="check[^"]*" data-status="(\w+)"[^>]*?(style="display: none;")?>', dom.stdout)
        self.assertEqual(len(rows), total["checks_total"])
        visible = [s for s, hidden in rows if not hidden]
        self.assertEqual(visible, ["fail"] * total["checks_failed"])


if __name__ == "__main__":
    if CHROMIUM is None:
        print(f"SKIP: {NO_CHROMIUM}")
        sys.exit(SKIP)
    unittest.main()
