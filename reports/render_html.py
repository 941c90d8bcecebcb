#!/usr/bin/python3
"""Renders a cpharness report.json as one self-contained HTML page.

    render_html.py REPORT.json -o REPORT.html [--title TEXT]

The page needs nothing at view time: every figure is inline SVG (matplotlib's SVG backend, or drawn here for the
block-mask tile grids), the style and the small filter script are inline, nothing is fetched.

Sections: summary (status, cases, failed checks, the first failing check's message and first divergence); per case:
loss and grad norm per step with the relative error per step against its threshold (log axis), the layer divergence
profile per cp, the block-mask tile grids, the ring owners and exchanges, the block-mask cache counts against the
expected ones; then every check as a row, failing rows first, filterable. A section whose data the report lacks says
so in one line. The optional report.json fields it reads are described in reports/README.md.

Exit status: 0 written; 2 bad input (missing or unreadable file, invalid JSON, a required key missing or of the
wrong type; the message names the file and the key path) or matplotlib missing, or the output cannot be written.
Needs python3 and matplotlib (Debian: python3-matplotlib; ci/setup.sh installs it), nothing else.
"""

import argparse
import html
import io
import json
import math
import multiprocessing
import os
import re
import sys
import tempfile

PROG = "render_html.py"
EXIT_BAD_INPUT = 2

# Draw limits of the block-mask section (also enforced by the schema): a grid is drawn when it has at most
# MAX_TILES_PER_SIDE q blocks and kv blocks; at most MAX_GRIDS_PER_CP grids are drawn per case and cp size.
MAX_TILES_PER_SIDE = 64
MAX_GRIDS_PER_CP = 64

FAILING = ("fail", "error")
STATUS_ORDER = {"fail": 0, "error": 0, "skipped": 1, "pass": 2}
TRAJ_METRICS = (("loss", "train.loss_parity", "loss"), ("grad_norm", "train.grad_norm_parity", "grad norm"))
TILE_COLOURS = {"F": "#2f5597", "P": "#f4a340", "E": "#eef0f3"}
TILE_NAMES = {"F": "full", "P": "partial", "E": "empty"}


class InputError(Exception):
    """Bad input: the message names the key path and the reason."""


def fail(message):
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


# ---- input ------------------------------------------------------------------------------------------------------


def _need(obj, key, types, path):
    if not isinstance(obj, dict):
        raise InputError(f"{path or '<root>'}: expected an object, got {type(obj).__name__}")
    where = f"{path}.{key}" if path else key
    if key not in obj:
        raise InputError(f"{where}: missing required key")
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise InputError(f"{where}: expected {names}, got {type(value).__name__}")
    return value


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def validate(report):
    """The keys the page cannot do without; everything else is optional and drawn when present."""
    if not isinstance(report, dict):
        raise InputError(f"<root>: expected an object, got {type(report).__name__}")
    _need(report, "status", str, "")
    _need(report, "summary", dict, "")
    cases = _need(report, "cases", list, "")
    for i, case in enumerate(cases):
        path = f"cases[{i}]"
        _need(case, "id", str, path)
        _need(case, "status", str, path)
        checks = _need(case, "checks", list, path)
        for j, check in enumerate(checks):
            cpath = f"{path}.checks[{j}]"
            _need(check, "name", str, cpath)
            _need(check, "status", str, cpath)
            _need(check, "cp", int, cpath)
        for key in ("trajectories", "block_mask_cache", "ring", "divergence_profile", "block_masks",
                    "block_mask_cache_expected", "oracle_trajectory", "weights"):
            if key in case and not isinstance(case[key], dict):
                raise InputError(f"{path}.{key}: expected an object, got {type(case[key]).__name__}")


def load_report(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}") from None
    try:
        report = json.loads(raw.decode("utf-8", errors="replace"), parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise InputError(f"invalid JSON: {e}") from None
    validate(report)
    return report


def _reject_constant(name):
    raise ValueError(f"non-JSON constant {name}")


# ---- small helpers ----------------------------------------------------------------------------------------------


# C0/C1 controls (tab and newline aside), DEL and noncharacters are parse errors in HTML: shown as U+FFFD.
_UNSHOWABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffe\uffff]")


def esc(x):
    return html.escape(_UNSHOWABLE.sub("\ufffd", "" if x is None else str(x)), quote=True)


def num(v):
    """A series or measure value as float (the strings "nan", "inf", "-inf" included); None when absent."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return None


def measure(check, key):
    v = check.get(key)
    if v is None and check.get(key + "_nonfinite") in ("nan", "inf", "-inf"):
        return float(check[key + "_nonfinite"])
    return num(v)


def fmt_measure(check, key):
    v = measure(check, key)
    if v is None:
        return ""
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if check.get("policy") == "count" and v == int(v):
        return str(int(v))
    return f"{v:.3g}"


def fmt_num(v, digits=4):
    if v is None:
        return "–"
    if math.isnan(v) or math.isinf(v):
        return str(v)
    return f"{v:.{digits}g}"


def cp_items(mapping):
    """(int cp, value) pairs of a by-cp object, sorted by cp; keys that are not cp sizes are ignored."""
    out = []
    for k, v in (mapping or {}).items():
        if isinstance(k, str) and k.isdigit() and int(k) >= 1:
            out.append((int(k), v))
    return sorted(out, key=lambda kv: kv[0])


def slug(text):
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-") or "x"


def status_badge(status):
    s = str(status)
    return f'<span class="badge st-{esc(slug(s))}">{esc(s)}</span>'


def note(text):
    return f'<p class="absent">{esc(text)}</p>'


def check_label(c):
    parts = [f"cp={c.get('cp')}"]
    if c.get("rank") is not None:
        parts.append(f"rank={c.get('rank')}")
    if c.get("step") is not None:
        parts.append(f"step={c.get('step')}")
    return f"{c.get('name')}[{','.join(parts)}]"


# ---- figures ----------------------------------------------------------------------------------------------------


_ROUND = re.compile(r"(\d+\.\d\d)\d+")  # coordinates to 0.01 pt


class Figures:
    """matplotlib figures as inline SVG, with ids made unique per figure so that several SVGs share one page."""

    def __init__(self, prefix=""):
        self.prefix = prefix  # ids unique across Figures objects that render parts of one page
        try:
            import matplotlib
            matplotlib.use("Agg")
            from matplotlib.figure import Figure
            import matplotlib.ticker as ticker
            import matplotlib.patches  # noqa: F401  (figs.mpl.patches)
        except ImportError as e:
            fail(f"matplotlib is missing ({e}); install Debian's python3-matplotlib (ci/setup.sh does)")
        self.mpl = matplotlib
        self.Figure = Figure
        self.ticker = ticker
        self.count = 0
        matplotlib.rcParams.update({
            "svg.fonttype": "none",          # text stays text: small files, selectable labels
            "font.family": "DejaVu Sans",
            "font.size": 8.5,
            "axes.titlesize": 9,
            "axes.labelsize": 8.5,
            "legend.fontsize": 7.5,
            "xtick.labelsize": 7.5,
            "ytick.labelsize": 7.5,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.color": "#e3e6ea",
            "grid.linewidth": 0.6,
            "lines.linewidth": 1.4,
            "lines.markersize": 4,
        })

    def new(self, w, h, **margins):
        """A figure of w x h inches with fixed margins (fractions): one draw per figure, no tight layout pass."""
        fig = self.Figure(figsize=(w, h))
        fig.subplots_adjust(**margins)
        return fig

    def svg(self, fig, kind, caption=""):
        self.count += 1
        fid = f"{self.prefix}fig{self.count}"
        buf = io.StringIO()
        with self.mpl.rc_context({"svg.hashsalt": fid}):
            fig.savefig(buf, format="svg", metadata={"Date": None})
        text = buf.getvalue()
        text = text[text.index("<svg"):]
        text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
        text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{fid}-{m.group(1)}"', text)
        text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{fid}-{m.group(1)})", text)
        text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{fid}-{m.group(1)}"', text)
        text = re.sub(r'="([^"]*)"', lambda m: '="' + _ROUND.sub(r"\1", m.group(1)) + '"', text)  # attributes only
        text = re.sub(r'<svg ', f'<svg class="plot" role="img" aria-label="{esc(kind)}" ', text, count=1)
        cap = f"<figcaption>{caption}</figcaption>" if caption else ""
        return f'<figure class="fig" id="{fid}" data-figure="{esc(kind)}">{text}{cap}</figure>'


# The top of a log axis: a threshold may be anything up to 1e308 (a case may allow it), which matplotlib's log
# locator cannot place; values above are drawn at the cap.
LOG_CAP = 1e30


def _log_floor(values):
    pos = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return (min(pos) / 10.0) if pos else 1e-12


def _plot_log(ax, xs, ys, floor, **kw):
    """ys on a log axis: zeros drawn at `floor` (hollow), non-finite at the top (x marker)."""
    fin_x, fin_y = [], []
    for x, y in zip(xs, ys):
        if y is None:
            continue
        fin_x.append(x)
        fin_y.append(floor if (math.isfinite(y) and y <= 0) else (min(y, LOG_CAP) if math.isfinite(y) else float("nan")))
    line = ax.plot(fin_x, fin_y, **kw)[0] if fin_x else None
    for x, y in zip(xs, ys):
        if y is not None and not math.isfinite(y):
            ax.annotate("nan" if math.isnan(y) else "inf", (x, 1), xycoords=("data", "axes fraction"),
                        color=kw.get("color", "red"), ha="center", va="top", fontsize=7)
        elif y is not None and y <= 0:
            ax.plot([x], [floor], marker="o", mfc="white", color=kw.get("color"), ls="none")
    return line


# Red is kept for what failed; cp sizes, ranks and chunk owners get the other colours.
def _log_format(v, _pos=None):
    if v <= 0:
        return ""
    e = math.floor(math.log10(v) + 1e-9)
    m = v / 10 ** e
    return f"1e{e}" if abs(m - 1) < 1e-6 else f"{m:.0f}e{e}"


def _log_axis(ax, figs):
    """A log y axis with plain "1e-5" labels and no minor ticks (mathtext labels and minor ticks are most of the
    drawing time of a small figure)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(figs.ticker.LogLocator(base=10, numticks=7))
    ax.yaxis.set_major_formatter(figs.ticker.FuncFormatter(_log_format))
    ax.yaxis.set_minor_locator(figs.ticker.NullLocator())


CP_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#7f7f7f"]
FAIL_RED = "#d00000"


def cp_colour(i):
    return CP_COLOURS[i % len(CP_COLOURS)]


# ---- sections ---------------------------------------------------------------------------------------------------


def reference_cp(case):
    ref = case.get("reference_cp")
    if isinstance(ref, int) and ref >= 1:
        return ref
    keys = [cp for cp, _ in cp_items(case.get("trajectories"))]
    return min(keys) if keys else 1


def candidate_cps(case):
    ref = reference_cp(case)
    cps = set()
    for v in case.get("cp_sizes") or []:
        if isinstance(v, int) and v != ref:
            cps.add(v)
    for key in ("trajectories", "divergence_profile", "block_masks", "ring", "block_mask_cache"):
        cps.update(cp for cp, _ in cp_items(case.get(key)) if cp != ref)
    return sorted(cps)


def first_divergence(check):
    d = (check.get("details") or {}).get("first_divergence") if isinstance(check.get("details"), dict) else None
    return d if isinstance(d, dict) else None


def fmt_divergence(d):
    parts = [str(d.get(k)) for k in ("kind", "tensor") if d.get(k) not in (None, "")]
    if isinstance(d.get("layer"), int) and d["layer"] >= 0:
        parts.append(f"(layer {d['layer']})")
    rel = num(d.get("rel_error"))
    if rel is not None:
        parts.append(f"rel {fmt_num(rel, 3)}")
    if d.get("dump"):
        parts.append(f"dump {d['dump']}")
    return " ".join(parts)


def all_checks(report):
    rows = []
    for ci, case in enumerate(report.get("cases", [])):
        for k, check in enumerate(case.get("checks", [])):
            rows.append((ci, k, case, check))
    return rows


def cases_failing_first(report):
    cases = report.get("cases", [])
    return sorted(cases, key=lambda c: 0 if c.get("status") in FAILING else 1)


def render_summary(report):
    s = report.get("summary", {})
    status = report.get("status")
    out = ['<section id="summary" data-section="summary"><h2>Summary</h2>']
    out.append(f'<p class="headline">{status_badge(status)} '
               f'{esc(s.get("cases", len(report.get("cases", []))))} cases: '
               f'{esc(s.get("passed", "?"))} passed, {esc(s.get("failed", "?"))} failed, '
               f'{esc(s.get("errors", "?"))} errored, {esc(s.get("skipped", "?"))} skipped &middot; '
               f'checks: {esc(s.get("checks_total", "?"))} total, '
               f'<b>{esc(s.get("checks_failed", "?"))} failed</b>, {esc(s.get("checks_errors", "?"))} errored, '
               f'{esc(s.get("checks_skipped", "?"))} skipped &middot; {fmt_num(num(s.get("duration_s")), 3)} s</p>')
    if report.get("error"):
        out.append(f'<p class="runerror">run error: {esc(report["error"])}</p>')
    failing = [(case, c) for _, _, case, c in all_checks(report) if c.get("status") in FAILING]
    if failing:
        case, c = failing[0]
        out.append('<div class="firstfail" id="first-failure"><h3>First failing check</h3>')
        out.append(f'<p><a href="#case-{esc(slug(case["id"]))}">{esc(case["id"])}</a> &middot; '
                   f'<code>{esc(check_label(c))}</code> {status_badge(c.get("status"))} &middot; '
                   f'<a href="#filter:status=failing">all {len(failing)} failing checks</a></p>')
        out.append(f'<p class="msg">{esc(c.get("message", ""))}</p>')
        div = first_divergence(c) or next((first_divergence(k) for _, k in failing if first_divergence(k)), None)
        if div:
            out.append(f'<p class="div">first divergence: <b>{esc(fmt_divergence(div))}</b></p>')
        else:
            out.append('<p class="div absent">no first divergence recorded for this failure</p>')
        out.append("</div>")
    # Cases table.
    out.append('<table class="cases"><thead><tr><th>case</th><th>status</th><th>dtype</th><th>cp</th>'
               '<th>checks</th><th>failed</th><th>time (s)</th><th>note</th></tr></thead><tbody>')
    for case in cases_failing_first(report):
        checks = case.get("checks", [])
        nfail = sum(1 for c in checks if c.get("status") in FAILING)
        why = case.get("error") or case.get("skip_reason") or ""
        cps = ", ".join(str(x) for x in case.get("cp_sizes") or [])
        out.append(f'<tr class="row-{esc(slug(case.get("status")))}"><td><a href="#case-{esc(slug(case["id"]))}">'
                   f'{esc(case["id"])}</a></td><td>{status_badge(case.get("status"))}</td>'
                   f'<td>{esc(case.get("dtype", ""))}</td><td>{esc(cps)}</td><td>{len(checks)}</td>'
                   f'<td>{nfail}</td><td>{fmt_num(num(case.get("duration_s")), 3)}</td><td>{esc(why)}</td></tr>')
    out.append("</tbody></table></section>")
    return "\n".join(out)


def _step_checks(case, name, cp):
    """Per-step checks of `name` at `cp`: {step: (observed, threshold, status)}."""
    out = {}
    for c in case.get("checks", []):
        if c.get("name") == name and c.get("cp") == cp and isinstance(c.get("step"), int):
            out[c["step"]] = (measure(c, "observed"), measure(c, "threshold"), c.get("status"))
    return out


def render_trajectories(case, figs):
    head = '<div class="sub" data-section="trajectories"><h3>Trajectories</h3>'
    trajs = dict(cp_items(case.get("trajectories")))
    if not trajs:
        return head + note("trajectories: not in this report") + "</div>"
    ref = reference_cp(case)
    cands = [cp for cp in sorted(trajs) if cp != ref]
    oracle = case.get("oracle_trajectory") if isinstance(case.get("oracle_trajectory"), dict) else None
    fig = figs.new(11.5, 5.2, left=0.065, right=0.99, top=0.95, bottom=0.085, wspace=0.14, hspace=0.3)
    axes = fig.subplots(2, 2, sharex=True)
    computed = False
    for col, (key, check_name, label) in enumerate(TRAJ_METRICS):
        ax = axes[0][col]
        if ref in trajs:
            ys = [num(v) for v in trajs[ref].get(key, [])]
            ax.plot(range(len(ys)), ys, color="black", marker="o", label=f"cp {ref} (reference)")
        for i, cp in enumerate(cands):
            ys = [num(v) for v in trajs[cp].get(key, [])]
            ax.plot(range(len(ys)), ys, color=cp_colour(i), marker="x", ls="--", label=f"cp {cp}")
        if oracle:
            ys = [num(v) for v in oracle.get(key, [])]
            ax.plot(range(len(ys)), ys, color="#888888", marker=".", ls=":",
                    label=f"cp {ref} {oracle.get('dtype', '')} oracle")
        ax.set_title(f"{label} per step")
        ax.legend(loc="best", frameon=False)
        ax.yaxis.set_major_formatter(figs.ticker.FormatStrFormatter("%.6g"))
        # Relative error per step against its threshold.
        ax = axes[1][col]
        all_vals = []
        series = []
        for i, cp in enumerate(cands):
            per_step = _step_checks(case, check_name, cp)
            if per_step:
                steps = sorted(per_step)
                obs = [per_step[s][0] for s in steps]
                thr = [per_step[s][1] for s in steps]
                bad = [s for s in steps if per_step[s][2] in FAILING]
            else:  # no per-step check: |cpN - ref| / |ref| from the trajectories, no threshold
                computed = True
                r = [num(v) for v in trajs.get(ref, {}).get(key, [])]
                c = [num(v) for v in trajs[cp].get(key, [])]
                steps = list(range(min(len(r), len(c))))
                obs = [abs(c[s] - r[s]) / abs(r[s]) if r[s] not in (None, 0) and c[s] is not None else None
                       for s in steps]
                thr, bad = [], []
            series.append((i, cp, steps, obs, thr, bad))
            all_vals += [v for v in obs + thr if v is not None]
        floor = _log_floor(all_vals)
        for i, cp, steps, obs, thr, bad in series:
            _plot_log(ax, steps, obs, floor, color=cp_colour(i), marker="o", label=f"cp {cp} rel. error")
            if thr:
                _plot_log(ax, steps, thr, floor, color=cp_colour(i), ls=(0, (4, 2)), lw=1.0, label=f"cp {cp} threshold")
            for s in bad:
                y = obs[steps.index(s)]
                if y is not None and math.isfinite(y) and y > 0:
                    ax.plot([s], [min(y, LOG_CAP)], marker="o", ms=9, mfc="none", mec=FAIL_RED, mew=1.6, ls="none")
        _log_axis(ax, figs)
        ax.set_title(f"{label}: relative error vs cp {ref} (log)")
        ax.set_xlabel("optimizer step")
        if series:
            ax.legend(loc="best", frameon=False)
        else:
            ax.text(0.5, 0.5, "no candidate cp", transform=ax.transAxes, ha="center")
    steps_n = max((len(t.get("loss", [])) for t in trajs.values()), default=0)
    for ax in axes[1]:
        ax.xaxis.set_major_locator(figs.ticker.MaxNLocator(integer=True))
        if steps_n:
            ax.set_xlim(-0.3, steps_n - 0.7)
    cap = (f"Top: values per optimizer step (cp {ref} is the reference). Bottom: relative error per step, with the "
           "threshold of each step's check dashed; a red ring marks a failed step; a hollow point is an exact 0.")
    if computed:
        cap += " Where the report has no per-step check the error is computed from the trajectories (no threshold)."
    return head + figs.svg(fig, "trajectories", esc(cap)) + "</div>"


def _group_ticks(names, max_labels=28):
    """Tick positions and labels: one per layer group ("L3") or per lone name, thinned to at most max_labels."""
    pos, labels, last = [], [], None
    for i, n in enumerate(names):
        m = re.match(r"(?:model\.)?layers\.(\d+)\.", n)
        g = f"L{m.group(1)}" if m else {"embeddings": "emb", "embed_tokens.weight": "emb"}.get(n, n.split(".")[0])
        if g != last:
            pos.append(i)
            labels.append(g)
            last = g
    if len(pos) > max_labels:
        k = math.ceil(len(pos) / max_labels)
        pos, labels = pos[::k], labels[::k]
    return pos, labels


def render_divergence(case, figs):
    head = ('<div class="sub" data-section="divergence"><h3>Layer divergence profile</h3>')
    profiles = cp_items(case.get("divergence_profile"))
    if not profiles:
        return head + note("divergence profile (per-layer relative error at step 0): not in this report") + "</div>"
    out = [head]
    for cp, prof in profiles:
        if not isinstance(prof, dict):
            continue
        parts = [("hidden", "hidden states, forward order"), ("grads", "gradients, backward order")]
        fig = figs.new(11.5, 3.0, left=0.065, right=0.99, top=0.85, bottom=0.17, wspace=0.08)
        axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2]})
        first = None
        for ax, (key, title) in zip(axes, parts):
            entries = [e for e in prof.get(key) or [] if isinstance(e, dict)]
            if not entries:
                ax.text(0.5, 0.5, f"no {key} in the profile", transform=ax.transAxes, ha="center")
                ax.set_title(title)
                continue
            names = [str(e.get("name", "?")) for e in entries]
            rel = [num(e.get("rel")) for e in entries]
            thr = [num(e.get("threshold")) for e in entries]
            xs = list(range(len(entries)))
            floor = _log_floor(rel + thr)
            many = len(xs) > 80  # a line alone: hundreds of markers would only blur (and bloat the SVG)
            _plot_log(ax, xs, rel, floor, color="#1f77b4", marker=None if many else "o", ms=2.5, lw=0.9 if many else 1.0,
                      label="relative L2 error")
            ax.step(xs, [min(t, LOG_CAP) if t is not None and math.isfinite(t) else float("nan") for t in thr], where="mid",
                    color="#555555", ls="--", lw=1.0, label="threshold")
            over = [i for i in xs if rel[i] is not None and thr[i] is not None and
                    (not math.isfinite(rel[i]) or rel[i] > thr[i])]
            if over:
                ax.plot([xs[i] for i in over], [min(rel[i], LOG_CAP) if math.isfinite(rel[i]) else floor for i in over],
                        ls="none", marker="o", ms=4.5, color=FAIL_RED, label="over threshold")
                if first is None:
                    first = (key, names[over[0]], rel[over[0]])
                    ax.axvline(over[0], color=FAIL_RED, lw=0.8, ls=":")
                    ax.text(over[0], 0.03, f" first out of tolerance: {names[over[0]]} ", transform=ax.get_xaxis_transform(),
                            ha="right" if over[0] > len(xs) / 2 else "left", va="bottom", fontsize=7.5, color=FAIL_RED,
                            bbox={"fc": "white", "ec": "none", "alpha": 0.85, "pad": 1.5})
            _log_axis(ax, figs)
            top = min(max([v for v in rel + thr if v is not None and math.isfinite(v)] + [floor]), LOG_CAP)
            ax.set_ylim(top=top * 4)
            pos, labels = _group_ticks(names, 16 if key == "hidden" else 32)
            ax.set_xticks(pos)
            ax.set_xticklabels(labels, rotation=90, fontsize=6.5)
            ax.set_xlim(-0.8, len(xs) - 0.2)
            ax.set_title(f"{title} ({len(entries)})")
        axes[0].set_ylabel("relative L2 error")
        axes[0].legend(loc="best", frameon=False)
        fig.suptitle(f"cp {cp} vs cp {reference_cp(case)}, step {prof.get('step', 0)} ({prof.get('policy', '')})",
                     fontsize=9, x=0.01, ha="left")
        cap = ("Relative L2 error of each layer's hidden states (forward order), then each gradient (backward order), "
               "against the threshold of each tensor.")
        if first:
            cap += f" First out of tolerance: <b>{esc(first[1])}</b> (rel {esc(fmt_num(first[2], 3))})."
        else:
            cap += " Every tensor is within its threshold."
        out.append(figs.svg(fig, "divergence", cap))
    return "\n".join(out) + "</div>"


def _grid_svg(grid, px):
    q, kv = grid["q_blocks"], grid["kv_blocks"]
    rows = grid["tiles"]
    w, h = kv * px, q * px
    parts = [f'<svg class="tiles" width="{w + 1}" height="{h + 1}" viewBox="0 0 {w + 1} {h + 1}" '
             f'xmlns="http://www.w3.org/2000/svg"><rect x="0" y="0" width="{w + 1}" height="{h + 1}" fill="#ffffff"/>']
    for r, row in enumerate(rows):
        c = 0
        while c < len(row):  # one rect per run of equal tiles
            e = c
            while e < len(row) and row[e] == row[c]:
                e += 1
            parts.append(f'<rect x="{c * px + 0.5}" y="{r * px + 0.5}" width="{(e - c) * px}" height="{px}" '
                         f'fill="{TILE_COLOURS.get(row[c], "#ff00ff")}"/>')
            c = e
    if px >= 4:  # tile borders
        lines = [f"M{x * px + 0.5} 0.5V{h + 0.5}" for x in range(kv + 1)] + \
                [f"M0.5 {y * px + 0.5}H{w + 0.5}" for y in range(q + 1)]
        parts.append(f'<path d="{" ".join(lines)}" stroke="#ffffff" stroke-width="{1 if px >= 6 else 0.5}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _grid_ok(g):
    if not isinstance(g, dict):
        return False
    for key, required in (("rank", True), ("chunk_owner", True), ("q_start", False), ("kv_start", False)):
        v = g.get(key)
        if (v is not None or required) and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return False
    q, kv, tiles = g.get("q_blocks"), g.get("kv_blocks"), g.get("tiles")
    if not (isinstance(q, int) and isinstance(kv, int) and 1 <= q <= MAX_TILES_PER_SIDE and 1 <= kv <= MAX_TILES_PER_SIDE):
        return False
    if isinstance(tiles, str):  # a flat string is accepted too
        if len(tiles) != q * kv:
            return False
        g["tiles"] = [tiles[i * kv:(i + 1) * kv] for i in range(q)]
        tiles = g["tiles"]
    return (isinstance(tiles, list) and len(tiles) == q and
            all(isinstance(r, str) and len(r) == kv and set(r) <= set("FPE") for r in tiles))


def render_block_masks(case, figs):
    head = '<div class="sub" data-section="block-masks"><h3>Block masks</h3>'
    masks = cp_items(case.get("block_masks"))
    if not masks:
        return head + note("block-mask tile grids: not in this report") + "</div>"
    legend = " ".join(f'<span class="sw" style="background:{TILE_COLOURS[k]}"></span>{TILE_NAMES[k]}' for k in "FPE")
    out = [head, f'<p class="legend">Each grid: q blocks (rows) &times; kv blocks (columns) of the chunk one rank '
                 f'computed against one ring chunk. {legend}. Drawn up to {MAX_TILES_PER_SIDE}&times;'
                 f'{MAX_TILES_PER_SIDE} tiles per grid and {MAX_GRIDS_PER_CP} grids per cp size.</p>']
    for cp, grids in masks:
        grids = grids if isinstance(grids, list) else []
        ok = [g for g in grids if _grid_ok(g)]
        skipped = len(grids) - len(ok)
        if len(ok) > MAX_GRIDS_PER_CP:
            skipped += len(ok) - MAX_GRIDS_PER_CP
            ok = ok[:MAX_GRIDS_PER_CP]
        by_type = {}
        for g in ok:
            by_type.setdefault(str(g.get("layer_type")), []).append(g)
        for layer_type, gs in by_type.items():
            # Zigzag sharding: each rank and chunk is two sub-chunks, told apart by their global starts.
            ranks = sorted({(g["rank"], g.get("q_start", -1)) for g in gs})
            owners = sorted({(g["chunk_owner"], g.get("kv_start", -1)) for g in gs})
            side = max(max(g["q_blocks"], g["kv_blocks"]) for g in gs)
            px = max(2, min(14, 112 // side))
            cell = {(g["rank"], g.get("q_start", -1), g["chunk_owner"], g.get("kv_start", -1)): g for g in gs}

            def named(who, start, what):
                return f"{what} {who}" + (f" (tokens from {start})" if start >= 0 else "")

            rowsh = ['<table class="gridtab"><tr><th></th>' +
                     "".join(f"<th>{named(o, ks, 'K/V chunk of rank')}</th>" for o, ks in owners) + "</tr>"]
            for r, qs in ranks:
                tds = []
                for o, ks in owners:
                    g = cell.get((r, qs, o, ks))
                    if g is None:
                        tds.append('<td class="nogrid">–</td>')
                        continue
                    counts = {k: sum(row.count(k) for row in g["tiles"]) for k in "FPE"}
                    tip = (f"{named(r, qs, 'rank')}, {named(o, ks, 'chunk of rank')}: {counts['F']} full, "
                           f"{counts['P']} partial, {counts['E']} empty")
                    tds.append(f'<td title="{esc(tip)}">{_grid_svg(g, px)}<div class="cnt">'
                               f'{g["q_blocks"]}&times;{g["kv_blocks"]}: F{counts["F"]} P{counts["P"]} E{counts["E"]}'
                               f'</div></td>')
                rowsh.append(f"<tr><th>{named(r, qs, 'rank')}</th>{''.join(tds)}</tr>")
            rowsh.append("</table>")
            out.append(f'<figure class="fig masks" data-figure="block-masks"><figcaption>cp {cp}, layer type '
                       f'<b>{esc(layer_type)}</b></figcaption>{"".join(rowsh)}</figure>')
        if skipped:
            out.append(note(f"cp {cp}: {skipped} grid(s) beyond the draw limit or malformed, not drawn"))
    return "\n".join(out) + "</div>"


def _owners_ok(t):
    return isinstance(t, list) and t and all(isinstance(r, list) and all(isinstance(o, int) for o in r) for r in t)


def _draw_ring_pass(ax, figs, pass_name, owners):
    """Rows ranks, columns ring steps, each cell the owner of the K/V chunk held; arrows the chunk's moves. In a
    backward pass a last column shows each rank receiving the dK/dV of its own chunk from every rank that held it."""
    n_ranks = len(owners)
    n_steps = max(len(r) for r in owners)
    is_bwd = pass_name.startswith("back")

    def box(x, y, colour, text, dashed=False):
        ax.add_patch(figs.mpl.patches.FancyBboxPatch(
            (x - 0.32, y - 0.3), 0.64, 0.6, boxstyle="round,pad=0.02", fc=colour, alpha=0.22 if not dashed else 0.08,
            ec=colour, lw=1.0, ls="--" if dashed else "-"))
        ax.text(x, y, text, ha="center", va="center", fontsize=7.5)

    for r in range(n_ranks):
        for s, o in enumerate(owners[r]):
            box(s, r, cp_colour(o), f"K/V {o}")
    arrow = {"arrowstyle": "->", "color": "#444444", "lw": 0.9, "shrinkA": 0, "shrinkB": 0}
    for s in range(n_steps - 1):
        for r in range(n_ranks):
            if s >= len(owners[r]):
                continue
            for r2 in range(n_ranks):
                if s + 1 < len(owners[r2]) and owners[r2][s + 1] == owners[r][s]:
                    ax.annotate("", xy=(s + 1 - 0.34, r2), xytext=(s + 0.34, r), arrowprops=arrow)
    labels = [f"step {s}" for s in range(n_steps)]
    if is_bwd:
        home = n_steps + 0.25
        for r in range(n_ranks):
            box(home, r, cp_colour(r), f"dK/dV {r}", dashed=True)
        ret = {"arrowstyle": "->", "color": FAIL_RED, "lw": 0.7, "ls": (0, (3, 2)), "alpha": 0.75,
               "shrinkA": 0, "shrinkB": 0, "connectionstyle": "arc3,rad=-0.12"}
        for r in range(n_ranks):
            for s, o in enumerate(owners[r]):
                if o != r:
                    ax.annotate("", xy=(home - 0.34, o), xytext=(s + 0.3, r + 0.2), arrowprops=ret)
        labels.append("home")
    ax.set_xlim(-0.5, n_steps - 0.5 + (1.25 if is_bwd else 0))
    ax.set_ylim(n_ranks - 0.5, -0.5)
    ax.set_xticks(list(range(n_steps)) + ([n_steps + 0.25] if is_bwd else []))
    ax.set_xticklabels(labels)
    ax.set_yticks(range(n_ranks))
    ax.set_yticklabels([f"rank {r}" for r in range(n_ranks)])
    ax.grid(False)
    for sp in ax.spines.values():
        sp.set_visible(False)
    ax.tick_params(length=0)
    ax.set_title(f"{pass_name} pass" + ("; red: dK/dV returned to its owner" if is_bwd else ""), fontsize=8.5)


def render_ring(case, figs):
    head = '<div class="sub" data-section="ring"><h3>Ring: chunk owners and exchanges</h3>'
    rings = [(cp, r) for cp, r in cp_items(case.get("ring")) if isinstance(r, dict)]
    if not rings:
        return head + note("ring trace: not in this report") + "</div>"
    out = [head]
    for cp, ring in rings:
        by_pass = ring.get("owners_by_pass") if isinstance(ring.get("owners_by_pass"), dict) else {}
        tables = [(p, t) for p, t in by_pass.items() if _owners_ok(t)]
        recorded_note = ""
        if not tables and _owners_ok(ring.get("owners")):
            tables = [("forward", ring["owners"])]
            recorded_note = " (this report records one owners table, shown as the forward pass)"
        if not tables:
            out.append(note(f"cp {cp}: ring owners not in this report"))
            continue
        cols = [max(len(r) for r in t) + (1.3 if p.startswith("back") else 0) for p, t in tables]
        w = min(11.5, 0.8 + sum(0.95 * c + 0.5 for c in cols))
        h = 0.75 + 0.4 * max(len(t) for _, t in tables)
        fig = figs.new(w, h, left=0.55 / w, right=1 - 0.05 / w, top=1 - 0.3 / h, bottom=0.25 / h, wspace=0.12)
        axes = fig.subplots(1, len(tables), squeeze=False, gridspec_kw={"width_ratios": cols})[0]
        for ax, (pass_name, owners) in zip(axes, tables):
            _draw_ring_pass(ax, figs, pass_name, owners)
        passes = [p for p in ring.get("passes") or [] if isinstance(p, dict)]
        table = ""
        if passes:
            # Optional column: the most K/V chunks one rank held at once (collect: every chunk; stream: at most 2).
            peak = any("peak_chunks" in p for p in passes)
            head_peak = "<th>peak K/V chunks held by a rank</th>" if peak else ""
            table = ('<table class="small"><tr><th>pass</th><th>comm ops</th><th>bytes</th>' + head_peak + "</tr>" +
                     "".join(f"<tr><td>{esc(p.get('pass'))}</td><td>{esc(p.get('comm_ops'))}</td>"
                             f"<td>{esc(p.get('bytes'))}</td>"
                             + (f"<td>{esc(p.get('peak_chunks', '–'))}</td>" if peak else "") + "</tr>"
                             for p in passes) + "</table>")
        mode = ring.get("mode")
        mode_note = f" ({esc(mode)} ring)" if mode in ("collect", "stream") else ""
        stream_note = (" In the stream ring the dK/dV shares do not go home one by one as drawn: they accumulate as"
                       " they travel with their chunk and reach the owner in one exchange." if mode == "stream" else "")
        cap = (f"cp {cp}{mode_note}: the owner of the K/V chunk each rank holds at each ring step; arrows are the exchanges"
               f"{recorded_note}.{stream_note} Communication per optimizer step, summed over ranks:")
        out.append(figs.svg(fig, "ring", esc(cap)) + table)
    return "\n".join(out) + "</div>"


def _expected_cache(case, cp):
    """Expected per-rank-per-step counters: the report's block_mask_cache_expected, else the cache checks' details."""
    exp = dict(case.get("block_mask_cache_expected") or {}).get(str(cp))
    if isinstance(exp, dict):
        return {k: exp[k] for k in ("lookups", "builds", "hits", "resets", "builds_uncached") if isinstance(exp.get(k), int)}
    out = {}
    for c in case.get("checks", []):
        if c.get("cp") != cp or not isinstance(c.get("details"), dict):
            continue
        d = c["details"]
        if c.get("name") == "cache.build_count":
            for src, dst in (("expected_lookups", "lookups"), ("expected_builds_cached", "builds"),
                             ("expected_builds_uncached", "builds_uncached")):
                if isinstance(d.get(src), int):
                    out.setdefault(dst, d[src])
        elif c.get("name") == "cache.hit_count" and isinstance(d.get("expected_hits"), int):
            out.setdefault("hits", d["expected_hits"])
        elif c.get("name") == "cache.generation_reset":
            out.setdefault("resets", 1)
    return out


def render_cache(case, figs):
    head = '<div class="sub" data-section="cache"><h3>Block-mask cache per step</h3>'
    caches = [(cp, v) for cp, v in cp_items(case.get("block_mask_cache")) if isinstance(v, list) and v]
    if not caches:
        return head + note("block-mask cache counters: not in this report") + "</div>"
    out = [head]
    counters = ("lookups", "builds", "hits")  # resets: the cache.generation_reset check rows
    for cp, ranks in caches:
        exp = _expected_cache(case, cp)
        n_ranks = len(ranks)
        n_steps = max((len(r) for r in ranks if isinstance(r, list)), default=0)
        fig = figs.new(11.5, 2.3, left=0.045, right=0.99, top=0.78, bottom=0.19, wspace=0.16)
        axes = fig.subplots(1, len(counters))
        width = 0.8 / max(n_ranks, 1)
        mismatches = 0
        for ax, key in zip(axes, counters):
            for r, steps in enumerate(ranks):
                if not isinstance(steps, list):
                    continue
                xs = [s + (r - (n_ranks - 1) / 2) * width for s in range(len(steps))]
                ys = [st.get(key, 0) if isinstance(st, dict) else 0 for st in steps]
                colours = []
                for y in ys:
                    bad = key in exp and y != exp[key]
                    mismatches += bad
                    colours.append(FAIL_RED if bad else cp_colour(r))
                ax.bar(xs, ys, width=width * 0.9, color=colours, label=f"rank {r}")
            if key in exp:
                ax.axhline(exp[key], color="black", ls="--", lw=1.0, label="expected")
            ax.set_title(key + (f" (expected {exp[key]})" if key in exp else ""))
            ax.set_xticks(range(n_steps))
            ax.set_xlabel("optimizer step")
            ax.grid(axis="x", visible=False)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper right", ncol=len(labels), frameon=False, fontsize=7.5)
        bad_resets = sum(1 for steps in ranks if isinstance(steps, list) for st in steps
                         if isinstance(st, dict) and "resets" in exp and st.get("resets") != exp["resets"])
        mismatches += bad_resets
        cap = f"cp {cp}: per rank and optimizer step; dashed = expected per rank per step"
        if "resets" in exp:
            cap += f"; generation resets {'as expected' if not bad_resets else f'<b>wrong on {bad_resets} rank-steps</b>'}" \
                   f" ({exp['resets']} per step)"
        if "builds_uncached" in exp:
            cap += f" (without the cache every lookup builds: {exp['builds_uncached']})"
        cap += "; " + (f"<b>{mismatches} counter(s) differ from the expected value (red)</b>" if mismatches
                       else "every counter as expected" if exp else "no expected counts in this report")
        out.append(figs.svg(fig, "cache", cap))
    return "\n".join(out) + "</div>"


def _bytes(v):
    if not isinstance(v, int):
        return "&ndash;"
    return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.1f} MiB"


def render_performance(case, figs):
    """Where and how fast each run trained: per cp size and step, wall time, tokens/s per device, device peak memory."""
    head = '<div class="sub" data-section="performance"><h3>Performance</h3>'
    perf = [(cp, v) for cp, v in cp_items(case.get("performance")) if isinstance(v, dict)]
    if not perf:
        return head + note("step times and device memory: not in this report") + "</div>"
    rows = ['<table class="perf"><tr><th>cp</th><th>device</th><th>step</th><th>seconds</th>'
            '<th>tokens/s per device</th><th>peak allocated</th><th>peak reserved</th></tr>']
    for cp, p in perf:
        secs = p.get("step_seconds") or []
        tps = p.get("tokens_per_s_per_device") or []
        alloc = p.get("peak_allocated_bytes") or []
        res = p.get("peak_reserved_bytes") or []
        dev = f'{esc(p.get("device", "?"))} ({esc(p.get("device_name", ""))}, {esc(p.get("devices", 1))} device(s))'
        for s in range(len(secs)):
            rows.append(f"<tr><td>{cp}</td><td>{dev}</td><td>{s}</td><td>{fmt_num(num(secs[s]), 4)}</td>"
                        f"<td>{fmt_num(num(tps[s]) if s < len(tps) else None, 5)}</td>"
                        f"<td>{_bytes(alloc[s] if s < len(alloc) else None)}</td>"
                        f"<td>{_bytes(res[s] if s < len(res) else None)}</td></tr>")
    rows.append("</table>")
    cap = note("peak memory is the whole device's during the step (ranks sharing a GPU are counted together); "
               "none on the CPU")
    return head + "\n".join(rows) + cap + "</div>"


def render_weights(case):
    """Where a checkpoint case's weights came from; the weights that kept their seeded init are named."""
    w = case.get("weights")
    if not isinstance(w, dict):
        return ""
    kept = w.get("kept_init") if isinstance(w.get("kept_init"), list) else []
    text = (f'weights: <code>{esc(w.get("checkpoint"))}</code>, {esc(w.get("loaded"))} tensors loaded, '
            f'{esc(w.get("skipped_redundant"))} redundant and {esc(w.get("skipped_non_text"))} non-text tensors '
            f'skipped')
    if kept:
        text += (f'; <strong>{len(kept)} not in the checkpoint, kept their seeded initialisation</strong>: '
                 + ", ".join(f"<code>{esc(k)}</code>" for k in kept))
    return f'<p class="meta" data-weights="{len(kept)}">{text}</p>'


def render_case(case, figs):
    cid = slug(case["id"])
    out = [f'<section class="case" id="case-{esc(cid)}" data-case="{esc(case["id"])}" '
           f'data-status="{esc(case.get("status"))}">']
    cps = ", ".join(str(x) for x in case.get("cp_sizes") or [])
    out.append(f'<h2>{esc(case["id"])} {status_badge(case.get("status"))}</h2>')
    out.append(f'<p class="meta">dtype {esc(case.get("dtype", "?"))} &middot; cp {esc(cps)} &middot; reference cp '
               f'{reference_cp(case)} &middot; {len(case.get("checks", []))} checks &middot; '
               f'{fmt_num(num(case.get("duration_s")), 3)} s</p>')
    if case.get("description"):
        out.append(f'<p class="desc">{esc(case["description"])}</p>')
    if case.get("error"):
        out.append(f'<p class="runerror">error: {esc(case["error"])}</p>')
    out.append(render_weights(case))
    if case.get("status") == "skipped":
        out.append(f'<p class="absent">skipped: {esc(case.get("skip_reason") or "")}</p>')
    for fn in (render_trajectories, render_divergence, render_block_masks, render_ring, render_cache,
               render_performance):
        out.append(fn(case, figs))
    out.append("</section>")
    return "\n".join(out)


def render_checks(report):
    rows = all_checks(report)
    rows.sort(key=lambda r: (STATUS_ORDER.get(r[3].get("status"), 0), r[0], r[1]))
    names = sorted({r[3].get("name", "") for r in rows})
    counts = {}
    for r in rows:
        counts[r[3].get("status")] = counts.get(r[3].get("status"), 0) + 1
    out = ['<section id="checks" data-section="checks"><h2>Checks</h2>']
    out.append('<div class="filters"><label>status <select id="f-status">'
               '<option value="">all</option><option value="failing">failing (fail, error)</option>'
               + "".join(f'<option value="{s}">{s} ({counts.get(s, 0)})</option>'
                         for s in ("fail", "error", "skipped", "pass")) +
               '</select></label> <label>name <input id="f-name" type="search" list="f-names" '
               'placeholder="train.loss_parity, cache., ..."></label><datalist id="f-names">' +
               "".join(f'<option value="{esc(n)}">' for n in names) +
               '</datalist> <label>case <select id="f-case"><option value="">all</option>' +
               "".join(f'<option value="{esc(c["id"])}">{esc(c["id"])}</option>' for c in report.get("cases", [])) +
               f'</select></label> <span id="f-count" data-rows="{len(rows)}"></span> '
               f'<a href="#filter:status=failing">failing only</a></div>')
    out.append('<div class="tablewrap"><table id="checks-table" class="checks"><colgroup><col style="width:122px"><col style="width:190px"><col style="width:34px"><col style="width:44px"><col style="width:42px"><col style="width:150px"><col style="width:72px"><col style="width:72px"><col style="width:112px"><col style="width:66px"><col></colgroup><thead><tr><th>case</th><th>name</th><th>cp</th><th>rank</th>'
               '<th>step</th><th>metric</th><th>observed</th><th>threshold</th><th>policy</th><th>status</th>'
               '<th>message</th></tr></thead><tbody>')
    for _, _, case, c in rows:
        st = str(c.get("status"))
        out.append(
            f'<tr class="check row-{esc(slug(st))}" data-status="{esc(st)}" data-name="{esc(c.get("name"))}" '
            f'data-case="{esc(case["id"])}"><td>{esc(case["id"])}</td><td><code>{esc(c.get("name"))}</code></td>'
            f'<td>{esc(c.get("cp"))}</td><td>{esc("" if c.get("rank") is None else c.get("rank"))}</td>'
            f'<td>{esc("" if c.get("step") is None else c.get("step"))}</td><td>{esc(c.get("metric", ""))}</td>'
            f'<td class="n">{esc(fmt_measure(c, "observed"))}</td><td class="n">{esc(fmt_measure(c, "threshold"))}</td>'
            f'<td>{esc(c.get("policy", ""))}</td><td>{status_badge(st)}</td><td class="m">{esc(c.get("message", ""))}</td></tr>')
    out.append("</tbody></table></div>")
    if not rows:
        out.append(note("no checks in this report"))
    out.append("</section>")
    return "\n".join(out)


CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --pass:#1a7f37; --fail:#cf222e; --error:#9a3412;
        --skipped:#6e7781; }
* { box-sizing: border-box; }
body { font: 14px/1.45 "DejaVu Sans", system-ui, sans-serif; color: var(--fg); margin: 0; background: #f6f8fa; }
header { background: #24292f; color: #fff; padding: 14px 28px; }
header h1 { margin: 0; font-size: 20px; }
header .env { color: #c9d1d9; font-size: 12px; margin-top: 4px; }
.planted { background: #fff3cd; border: 1px solid #d29922; padding: 8px 12px; }
nav { padding: 6px 28px; background: #fff; border-bottom: 1px solid var(--line); font-size: 13px;
      position: sticky; top: 0; z-index: 2; }
nav a { margin-right: 12px; color: #0969da; text-decoration: none; }
main { max-width: 1240px; margin: 0 auto; padding: 8px 20px 40px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 10px 18px 14px;
          margin: 14px 0; }
h2 { font-size: 18px; margin: 6px 0 8px; }
h3 { font-size: 15px; margin: 14px 0 4px; }
.sub { border-top: 1px solid #eaeef2; margin-top: 8px; }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; color: #fff; font-size: 12px;
         font-weight: bold; vertical-align: middle; text-transform: uppercase; }
.st-pass { background: var(--pass); } .st-fail { background: var(--fail); } .st-error { background: var(--error); }
.st-skipped { background: var(--skipped); }
.headline { font-size: 15px; }
.firstfail { border-left: 4px solid var(--fail); background: #fff5f5; padding: 4px 14px; margin: 8px 0 12px; }
.firstfail h3 { margin-top: 6px; color: var(--fail); }
.firstfail .msg { font-family: "DejaVu Sans Mono", monospace; font-size: 13px; white-space: pre-wrap; }
.runerror { color: var(--error); font-weight: bold; }
.absent { color: var(--muted); font-style: italic; margin: 4px 0; }
.meta, .desc { color: var(--muted); margin: 2px 0; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #eaeef2; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
table.cases tr.row-fail td:first-child, table.cases tr.row-error td:first-child { border-left: 3px solid var(--fail); }
table.checks { width: 100%; font-size: 12.5px; }
table.checks td.n { text-align: right; font-family: "DejaVu Sans Mono", monospace; white-space: nowrap; }
table.checks { table-layout: fixed; }
table.checks td { overflow-wrap: break-word; }
table.checks td.m { color: var(--muted); }
.tablewrap { overflow-x: auto; }
table.checks tr.row-fail, table.checks tr.row-error { background: #fff0f0; }
table.small { font-size: 12px; margin: 2px 0 8px; }
figure.fig { margin: 6px 0; }
figure.masks { display: inline-block; vertical-align: top; margin-right: 28px; }
figure.fig svg.plot { max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 12px; }
.gridtab td, .gridtab th { border: none; padding: 3px 6px; font-size: 11px; text-align: center; }
.gridtab th { background: none; color: var(--muted); }
.gridtab .cnt { color: var(--muted); font-size: 10px; }
.legend .sw { display: inline-block; width: 11px; height: 11px; margin: 0 3px 0 8px; vertical-align: -1px;
              border: 1px solid #ccc; }
.filters { margin: 4px 0 8px; font-size: 13px; }
.filters input, .filters select { font: inherit; padding: 1px 4px; }
#f-count { color: var(--muted); margin-left: 10px; }
"""

SCRIPT = """
(function () {
  var table = document.getElementById('checks-table');
  if (!table) return;
  var rows = Array.prototype.slice.call(table.tBodies[0].rows);
  var st = document.getElementById('f-status'), nm = document.getElementById('f-name'),
      cs = document.getElementById('f-case'), count = document.getElementById('f-count');
  function apply() {
    var s = st.value, n = nm.value.trim().toLowerCase(), c = cs.value, shown = 0;
    rows.forEach(function (r) {
      var rs = r.getAttribute('data-status');
      var ok = (!s || (s === 'failing' ? (rs === 'fail' || rs === 'error') : rs === s)) &&
               (!n || r.getAttribute('data-name').toLowerCase().indexOf(n) >= 0) &&
               (!c || r.getAttribute('data-case') === c);
      r.style.display = ok ? '' : 'none';
      if (ok) shown++;
    });
    count.textContent = shown + ' of ' + rows.length + ' rows';
  }
  // A link can preset the filter: report.html#filter:status=failing&name=train.&case=tiny-e2b-packed
  function fromHash() {
    var h = decodeURIComponent(location.hash || '');
    if (h.indexOf('#filter:') !== 0) return;
    st.value = ''; nm.value = ''; cs.value = '';
    h.slice(8).split('&').forEach(function (kv) {
      var i = kv.indexOf('='), k = kv.slice(0, i), v = kv.slice(i + 1);
      if (k === 'status') st.value = v; else if (k === 'name') nm.value = v; else if (k === 'case') cs.value = v;
    });
    apply();
    document.getElementById('checks').scrollIntoView();
  }
  st.addEventListener('change', apply); cs.addEventListener('change', apply); nm.addEventListener('input', apply);
  window.addEventListener('hashchange', fromHash);
  apply();
  fromHash();
})();
"""


def _render_case_alone(args):
    index, case = args
    return render_case(case, Figures(prefix=f"c{index}-"))


def render_cases(cases):
    """Each case's section; on a machine with more than one core, cases are drawn in parallel (forked workers), the
    page's cost being mostly matplotlib's drawing of each case's figures."""
    jobs = list(enumerate(cases))
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                return pool.map(_render_case_alone, jobs, chunksize=1)
        except OSError:
            pass  # no processes to be had: draw them here
    return [_render_case_alone(j) for j in jobs]


def render(report, title=None):
    Figures()  # matplotlib imported (or its absence reported) once, before any worker forks
    tool = report.get("tool") or {}
    env = report.get("environment") or {}
    title = title or f"cpharness report: {report.get('status')}"
    env_bits = [f"{tool.get('name', 'cpharness')} {tool.get('version', '')} ({tool.get('git_sha', '?')})"]
    for key, label in (("device", "device"), ("comm_backend", "comm"), ("torch", "torch"), ("cuda", "CUDA"),
                       ("nccl", "NCCL"), ("transformers", "transformers")):
        if env.get(key):
            env_bits.append(f"{label} {env[key]}")
    if report.get("timestamp"):
        env_bits.append(str(report["timestamp"]))
    body = [render_summary(report)]
    if env.get("planted_bug"):  # a run that proves a gate can fail, never a real result
        body.insert(0, f'<p class="planted"><strong>Planted bug:</strong> {esc(env["planted_bug"])} '
                       "(CPHARNESS_PLANT_BUG): this run proves that a gate can go red; it is not a real result.</p>")
    body.extend(render_cases(cases_failing_first(report)))
    body.append(render_checks(report))
    nav = ['<a href="#summary">summary</a>'] + [
        f'<a href="#case-{esc(slug(c["id"]))}">{esc(c["id"])}</a>' for c in cases_failing_first(report)] + [
        '<a href="#checks">checks</a>']
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)} {status_badge(report.get('status'))}</h1>"
            f"<div class=\"env\">{esc(' · '.join(env_bits))}</div></header>"
            f"<nav>{' '.join(nav)}</nav><main>" + "\n".join(body) +
            f"</main><script>{SCRIPT}</script></body></html>\n")


def write_atomically(path, text):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(prog=PROG, description="Render a cpharness report.json as one self-contained HTML page.")
    ap.add_argument("report", help="report.json written by cpharness")
    ap.add_argument("-o", "--output", required=True, help="the HTML file to write (atomically)")
    ap.add_argument("--title", help="page title (default: 'cpharness report: STATUS')")
    args = ap.parse_args(argv)
    try:
        report = load_report(args.report)
    except InputError as e:
        fail(f"{args.report}: {e}")
    try:
        page = render(report, args.title)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as e:
        # The schema allows what the page cannot draw (an infinite-looking 1e308, a value of another type where
        # the writer never puts one): one line naming the report, never a traceback, and no page.
        fail(f"{args.report}: cannot render: {type(e).__name__}: {e}")
    try:
        write_atomically(args.output, page)
    except OSError as e:
        fail(f"{args.output}: cannot write: {e.strerror or e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
