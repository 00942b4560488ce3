"""Measure the rendered book in a headless browser: tables, figures, visible code, raw markup, hosts.

Serves the HTML folder of the book on 127.0.0.1 (``http.server`` in a thread, a free port), opens
every chapter page in Chromium at a desktop viewport (1280 x 900 CSS pixels, device scale 1) and
measures, per page, inside the article (``main#main-content article.bd-article`` of
sphinx-book-theme):

1. tables: each ``table`` element's width (``max(scrollWidth, bounding width)``) against the text
   column (the article's content box, ``clientWidth`` minus horizontal padding); a table is wider
   when it exceeds the column by more than 1 px. Tables inside a horizontally scrolling ancestor
   (``overflow-x: auto|scroll``, e.g. ``div.pst-scrollable-table-container``) are still wider, and
   counted separately as ``in_scroll_wrapper``.
2. figures: each ``img``: ``naturalWidth`` (pixels of the file), displayed width (CSS pixels) and
   their ratio; a figure is shown below native size when the ratio is < 0.9. A figure whose native
   width exceeds the column cannot reach 0.9: its file must be saved at a width <= the column.
3. code: lines of code visible in input cells (``div.cell_input`` of myst-nb); inputs collapsed by
   ``hide-input``/``hide-cell`` (inside a closed ``details.hide``) are counted separately, as are
   cells without an input (``remove-input``: the source is not in the page). Output text blocks:
   ``div.cell_output div.output`` holding a ``pre`` (stream, text/plain, traceback).
4. raw markup: occurrences of ``- **``, ``**``, ``$``, ``<urlopen error`` and ``Traceback`` in the
   rendered text of prose and outputs (code inputs, inline/literal code in prose, and MathJax
   output excluded); text that is present but collapsed (a solution before its click, a hidden
   output) is counted separately from the visible text. Math elements that MathJax left
   unrendered are counted too.
5. external hosts: ``script[src]``, ``link[href]``, ``img[src]``, ``iframe[src]``,
   ``source[src]``, ``video[src]``, ``audio[src]`` of the whole document pointing to a host other
   than the loopback one, and every network request of the page to such a host (recorded through
   ``page.on("request")``; the request is then aborted, nothing leaves the machine).
6. exercises: on the first page with a ``div.solution`` (sphinx-exercise with ``:class: dropdown``,
   collapsed by sphinx-togglebutton), screenshots of the solution before and after clicking its
   toggle, and a check that the solution's text is not visible before the click and is after.

Writes a JSON report (per page and totals) and prints a table. Exit status 1 when the solution
check fails or no page was found.

Needs Debian's ``chromium`` (``apt-get install chromium``, ``/usr/bin/chromium``) and the ``pages``
extra (``pip install -e '.[pages]'``: Playwright's Python client; its own browser download is not
used)::

    .venv/bin/python benchmarks/bench_pages.py --html book/_build/html --out benchmarks/reports/pages.json
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
VIEWPORT = {"width": 1280, "height": 900}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
SKIP_NAMES = {"genindex.html", "search.html", "py-modindex.html"}
SKIP_DIRS = {"_static", "_sources", "_images", "_downloads"}
PATTERNS = ["- **", "**", "$", "<urlopen error", "Traceback"]
BELOW_NATIVE = 0.9  # a figure is "shrunk" when displayed width / native width < this

# --------------------------------------------------------------------------------------------
# In-page measurement (runs in the browser). Returns plain JSON.
# --------------------------------------------------------------------------------------------
MEASURE_JS = r"""
async ({patterns, belowNative}) => {
  const withTimeout = (p, ms) => Promise.race([p, new Promise(r => setTimeout(r, ms))]);
  // images loaded (or failed), MathJax's first typeset done
  await withTimeout(Promise.all([...document.images].map(i => i.complete ? 0 :
      new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); }))), 20000);
  let mathjax = 'absent';
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await withTimeout(MathJax.startup.promise.then(() => { mathjax = 'typeset'; }), 30000);
    if (mathjax !== 'typeset') mathjax = 'timeout';
  }

  const article = document.querySelector('main#main-content article.bd-article')
               || document.querySelector('article.bd-article')
               || document.querySelector('main') || document.body;
  const cs = getComputedStyle(article);
  const column = article.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);

  const inClosedDetails = el => {
    for (let d = el.closest('details:not([open])'); d; d = d.parentElement && d.parentElement.closest('details:not([open])')) {
      const summary = d.querySelector(':scope > summary');
      if (!(summary && summary.contains(el))) return true;
    }
    return false;
  };
  const shown = el => {
    if (!el || inClosedDetails(el)) return false;
    if (!el.checkVisibility({checkOpacity: true, checkVisibilityCSS: true})) return false;
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0;
  };
  const clip = (s, n) => { s = (s || '').replace(/\s+/g, ' ').trim(); return s.length > n ? s.slice(0, n - 1) + '…' : s; };
  const sectionOf = el => { const s = el.closest('section[id]'); return s ? s.id : null; };
  const zoneOf = el => el.closest('.cell_output') ? 'output' : 'prose';
  const lineCount = s => { s = (s || '').replace(/\n+$/, ''); return s ? s.split('\n').length : 0; };

  // 1. tables -------------------------------------------------------------------------------
  const tables = [];
  for (const t of article.querySelectorAll('table')) {
    if (t.parentElement.closest('table')) continue;  // nested tables are part of their parent
    const visible = shown(t);
    const width = Math.max(t.scrollWidth, t.getBoundingClientRect().width);
    let wrapper = null;
    for (let p = t.parentElement; p && p !== article; p = p.parentElement) {
      const ox = getComputedStyle(p).overflowX;
      if (ox === 'auto' || ox === 'scroll') { wrapper = p; break; }
    }
    const firstRow = t.querySelector('thead tr') || t.querySelector('tr');
    const heads = firstRow ? [...firstRow.children] : [];
    const nCols = Math.max(0, ...[...t.querySelectorAll('tr')].map(r => r.children.length));
    const cap = t.querySelector('caption');
    tables.push({
      visible, zone: zoneOf(t), section: sectionOf(t), class: t.className || null,
      caption: cap ? clip(cap.innerText, 80) : null,
      headers: heads.map(h => clip(h.textContent, 40)).filter(h => h).slice(0, 4),
      n_columns: nCols, n_rows: t.querySelectorAll('tr').length,
      width: Math.round(width), column: Math.round(column),
      excess: Math.round(width - column),
      wider: visible && width > column + 1,
      in_scroll_wrapper: !!wrapper,
      wrapper_class: wrapper ? (wrapper.className || wrapper.tagName.toLowerCase()) : null,
      wrapper_scrolls: wrapper ? wrapper.scrollWidth > wrapper.clientWidth + 1 : false,
    });
  }

  // 2. figures ------------------------------------------------------------------------------
  const figures = [];
  for (const img of article.querySelectorAll('img')) {
    const visible = shown(img);
    const displayed = img.getBoundingClientRect().width;
    const natural = img.naturalWidth;
    const fig = img.closest('figure, div.figure');
    const capEl = fig ? fig.querySelector('figcaption, .caption') : null;
    let src = img.getAttribute('src') || '';
    if (src.startsWith('data:')) src = src.slice(0, 30) + '…';
    const ratio = natural ? displayed / natural : null;
    figures.push({
      visible, zone: zoneOf(img), section: sectionOf(img), src,
      alt: clip(img.getAttribute('alt'), 60), caption: capEl ? clip(capEl.innerText, 100) : null,
      natural_width: natural, natural_height: img.naturalHeight,
      displayed_width: Math.round(displayed * 10) / 10,
      ratio: ratio === null ? null : Math.round(ratio * 1000) / 1000,
      column: Math.round(column),
      wider_than_column: natural > column + 1,
      broken: img.complete && natural === 0,
      below_native: visible && ratio !== null && ratio < belowNative,
    });
  }

  // 3. code ---------------------------------------------------------------------------------
  const code = {input_cells_visible: 0, input_lines_visible: 0, input_cells_hidden: 0,
                input_lines_hidden: 0, cells_input_removed: 0, output_text_blocks_visible: 0,
                output_text_lines_visible: 0, output_text_blocks_hidden: 0,
                output_text_kinds: {}, literal_blocks_prose: 0, literal_lines_prose: 0,
                longest_input_cells: []};
  const inputs = [];
  for (const ci of article.querySelectorAll('div.cell_input')) {
    const pre = ci.querySelector('pre');
    const n = lineCount(pre ? pre.textContent : '');
    if (shown(ci)) {
      code.input_cells_visible += 1; code.input_lines_visible += n;
      inputs.push({lines: n, section: sectionOf(ci), first_line: clip((pre ? pre.textContent : '').split('\n')[0], 70)});
    } else { code.input_cells_hidden += 1; code.input_lines_hidden += n; }
  }
  inputs.sort((a, b) => b.lines - a.lines);
  code.longest_input_cells = inputs.slice(0, 5);
  for (const cell of article.querySelectorAll('div.cell')) {
    if (!cell.querySelector('div.cell_input')) code.cells_input_removed += 1;
  }
  for (const out of article.querySelectorAll('div.cell_output div.output')) {
    const pre = out.querySelector('pre');
    if (!pre) continue;
    const kind = [...out.classList].find(c => ['stream', 'text_plain', 'traceback', 'stderr', 'error'].includes(c)) || 'other';
    code.output_text_kinds[kind] = (code.output_text_kinds[kind] || 0) + 1;
    if (shown(pre)) { code.output_text_blocks_visible += 1; code.output_text_lines_visible += lineCount(pre.textContent); }
    else code.output_text_blocks_hidden += 1;
  }
  for (const pre of article.querySelectorAll('pre')) {
    if (pre.closest('.cell_input, .cell_output')) continue;
    if (!shown(pre)) continue;
    code.literal_blocks_prose += 1; code.literal_lines_prose += lineCount(pre.textContent);
  }

  // 4. raw markup in rendered text ------------------------------------------------------------
  const EXCLUDE = 'script, style, noscript, mjx-container, .MathJax, mjx-assistive-mml, .cell_input, .headerlink, button, summary';
  const raw = {visible: {}, collapsed: {}, examples: [], significance_stars: {visible: 0, collapsed: 0}};
  const STARS = /(?:(?<=\d)|^\s*)\*{2,3}(?=\s*$|[\s),;])/g;
  for (const p of patterns) { raw.visible[p] = {prose: 0, output: 0}; raw.collapsed[p] = {prose: 0, output: 0}; }
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
  const examplesPer = {};
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (!el || el.closest(EXCLUDE)) continue;
    const zone = zoneOf(el);
    if (zone === 'prose' && el.closest('pre, code, kbd, samp, tt')) continue;  // literal code in prose
    let text = n.nodeValue;
    if (!text) continue;
    const where = shown(el) ? 'visible' : 'collapsed';
    // significance stars (a run of 2-3 '*' right after a number, or alone in a table cell) are
    // intended text, not unrendered bold: counted apart, then blanked before the patterns
    const stars = text.match(STARS);
    if (stars) { raw.significance_stars[where] += stars.length; text = text.replace(STARS, ' '); }
    for (const p of patterns) {
      let i = text.indexOf(p), k = 0;
      while (i !== -1) {
        k += 1;
        const key = p + '|' + where;
        examplesPer[key] = (examplesPer[key] || 0) + 1;
        if (examplesPer[key] <= 4) raw.examples.push({pattern: p, where, zone, section: sectionOf(el),
            context: clip(text.slice(Math.max(0, i - 50), i + p.length + 50), 120)});
        i = text.indexOf(p, i + p.length);
      }
      raw[where][p][zone] += k;
    }
  }
  const mathEls = [...article.querySelectorAll('span.math, div.math')];
  raw.math_elements = mathEls.length;
  raw.math_unrendered = mathEls.filter(m => !m.querySelector('mjx-container') && !m.closest('mjx-container')).length;
  raw.unrendered_examples = mathEls.filter(m => !m.querySelector('mjx-container')).slice(0, 3).map(m => clip(m.textContent, 80));
  raw.mathjax = mathjax;

  // 5. external references in the document ----------------------------------------------------------
  const ext = [];
  const sel = 'script[src], link[href], img[src], iframe[src], source[src], video[src], audio[src], embed[src], object[data]';
  for (const el of document.querySelectorAll(sel)) {
    const url = el.src || el.href || el.data;
    if (!url) continue;
    let u; try { u = new URL(url, location.href); } catch (e) { continue; }
    if (!['http:', 'https:', 'ws:', 'wss:'].includes(u.protocol)) continue;
    if (u.hostname === location.hostname || ['127.0.0.1', 'localhost', '::1', '[::1]'].includes(u.hostname)) continue;
    ext.push({tag: el.tagName.toLowerCase(), rel: el.getAttribute('rel'), url: u.href});
  }

  return {
    title: document.title, column_width: Math.round(column * 10) / 10,
    article_found: article.matches('article.bd-article'),
    page_overflow_px: Math.max(0, document.documentElement.scrollWidth - document.documentElement.clientWidth),
    tables, figures, code, raw, external_refs: ext,
    has_solution: !!article.querySelector('div.solution'),
  };
}
"""

SOLUTION_STATE_JS = r"""
(sol) => {
  const title = sol.querySelector(':scope > .admonition-title');
  const body = [...sol.children].filter(c => !c.classList.contains('admonition-title'));
  const text = body.map(c => c.textContent).join(' ').replace(/\s+/g, ' ').trim();
  const probe = text.slice(0, 40);
  const parts = body.map(c => {
    const r = c.getBoundingClientRect();
    return {visible: c.checkVisibility({checkOpacity: true, checkVisibilityCSS: true}) && r.height > 0 && r.width > 0,
            height: Math.round(r.height)};
  });
  return {
    title: title ? title.innerText.replace(/\s+/g, ' ').trim() : null,
    text_sample: probe, text_chars: text.length,
    any_body_visible: parts.some(p => p.visible), all_body_visible: parts.length > 0 && parts.every(p => p.visible),
    text_in_inner_text: probe.length > 0 && sol.innerText.replace(/\s+/g, ' ').includes(probe),
    toggle_hidden_class: sol.classList.contains('toggle-hidden'),
    has_toggle_button: !!sol.querySelector('button.toggle-button'),
    box_height: Math.round(sol.getBoundingClientRect().height),
  };
}
"""


# --------------------------------------------------------------------------------------------
# Serving and discovery
# --------------------------------------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # noqa: D401 - silence the per-request log
        pass


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``directory`` on 127.0.0.1 at a free port in a daemon thread; return (server, base URL)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def chapter_pages(html: Path) -> list[str]:
    """Relative paths of the book's content pages under ``html``, in path order.

    Skips Sphinx's generated pages (index, search), asset folders and redirect-only pages (the
    root ``index.html`` of a Jupyter Book is a meta refresh to the first chapter)."""
    pages = []
    for p in sorted(html.rglob("*.html")):
        rel = p.relative_to(html)
        if rel.parts[0] in SKIP_DIRS or rel.name in SKIP_NAMES or rel.parts[0].startswith("."):
            continue
        head = p.read_text(errors="replace")[:2000].lower()
        if 'http-equiv="refresh"' in head and "bd-article" not in p.read_text(errors="replace"):
            continue
        pages.append(rel.as_posix())
    return pages


def _is_loopback(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss"):
        return True  # data:, blob:, about:, chrome: never leave the machine
    return (parts.hostname or "") in LOOPBACK


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
def summarise(page: str, m: dict, requests: list[str], http_errors: list[str], js_errors: list[str]) -> dict:
    """Per-page counts from the raw in-page measurement ``m``."""
    tables_visible = [t for t in m["tables"] if t["visible"]]
    wider = [t for t in tables_visible if t["wider"]]
    figs = [f for f in m["figures"] if f["visible"]]
    below = [f for f in figs if f["below_native"]]
    raw_vis = {p: c["prose"] + c["output"] for p, c in m["raw"]["visible"].items()}
    raw_col = {p: c["prose"] + c["output"] for p, c in m["raw"]["collapsed"].items()}
    # "- **" is a subset of "**": the total counts every other pattern once
    total = lambda d: sum(v for p, v in d.items() if p != "- **")  # noqa: E731
    ext_hosts = sorted({urlsplit(u).hostname or u for u in requests}
                       | {urlsplit(e["url"]).hostname or e["url"] for e in m["external_refs"]})
    return {
        "page": page,
        "title": m["title"],
        "column_width": m["column_width"],
        "article_found": m["article_found"],
        "page_overflow_px": m["page_overflow_px"],
        "tables": {"n": len(tables_visible), "n_hidden": len(m["tables"]) - len(tables_visible),
                   "n_wider": len(wider),
                   "n_wider_in_scroll_wrapper": sum(t["in_scroll_wrapper"] for t in wider),
                   "n_wider_unwrapped": sum(not t["in_scroll_wrapper"] for t in wider),
                   "wider": sorted(wider, key=lambda t: -t["excess"]), "all": m["tables"]},
        "figures": {"n": len(figs), "n_hidden": len(m["figures"]) - len(figs),
                    "n_below_native": len(below),
                    "n_below_native_wider_than_column": sum(f["wider_than_column"] for f in below),
                    "n_broken": sum(f["broken"] for f in m["figures"]),
                    "below_native": sorted(below, key=lambda f: f["ratio"]), "all": m["figures"]},
        "code": m["code"],
        "raw_markup": {"visible": raw_vis, "collapsed": raw_col,
                       "total_visible": total(raw_vis), "total_collapsed": total(raw_col),
                       "by_zone": {"visible": m["raw"]["visible"], "collapsed": m["raw"]["collapsed"]},
                       "examples": m["raw"]["examples"],
                       "significance_stars": m["raw"]["significance_stars"],
                       "math_elements": m["raw"]["math_elements"],
                       "math_unrendered": m["raw"]["math_unrendered"],
                       "math_unrendered_examples": m["raw"]["unrendered_examples"],
                       "mathjax": m["raw"]["mathjax"]},
        "external": {"n": len(m["external_refs"]) + len(requests), "hosts": ext_hosts,
                     "refs": m["external_refs"], "requests": requests},
        "http_errors": http_errors,
        "js_errors": js_errors,
    }


def check_solution(context, base: str, page: str, shots: Path) -> dict:
    """Screenshot the first solution of ``page`` before and after clicking its toggle.

    Returns the states and ``ok``: True when the solution's text was not visible before the click
    and was visible after it."""
    pg = context.new_page()
    pg.goto(base + page, wait_until="load")
    sol = pg.locator("article.bd-article div.solution").first
    # sphinx-togglebutton adds its button on DOMContentLoaded; wait for it if it is going to come
    try:
        sol.locator("button.toggle-button").wait_for(state="attached", timeout=5000)
    except Exception:  # noqa: BLE001 - no toggle: the check below reports it
        pass
    sol.scroll_into_view_if_needed()
    pg.wait_for_timeout(300)
    shots.mkdir(parents=True, exist_ok=True)

    def shoot(name: str) -> str:
        box = sol.bounding_box()
        margin = 24
        clip = {"x": max(0, box["x"] - margin), "y": max(0, box["y"] - margin),
                "width": box["width"] + 2 * margin, "height": box["height"] + 2 * margin}
        path = shots / name
        pg.screenshot(path=str(path), clip=clip)
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)

    before = sol.evaluate(SOLUTION_STATE_JS)
    before["screenshot"] = shoot("solution_hidden.png")
    button = sol.locator("button.toggle-button").first
    if button.count():
        button.click()
    else:
        sol.locator(".admonition-title").first.click()
    try:
        pg.wait_for_function(f"(s) => ({SOLUTION_STATE_JS})(s).all_body_visible",
                             arg=sol.element_handle(), timeout=5000)
    except Exception:  # noqa: BLE001 - reported by the state below
        pass
    pg.wait_for_timeout(500)  # the toggle animates its opacity
    after = sol.evaluate(SOLUTION_STATE_JS)
    after["screenshot"] = shoot("solution_shown.png")
    solution_id = sol.get_attribute("id")
    pg.close()
    ok = (before["text_chars"] > 0 and not before["any_body_visible"] and not before["text_in_inner_text"]
          and after["all_body_visible"] and after["text_in_inner_text"])
    return {"page": page, "solution_id": solution_id,
            "before": before, "after": after, "ok": ok}


def run(html: Path, out: Path, shots: Path, chromium: str, timeout_ms: int) -> int:
    from playwright.sync_api import sync_playwright
    import playwright

    pages = chapter_pages(html)
    if not pages:
        print(f"no pages found under {html}", file=sys.stderr)
        return 1
    server, base = serve(html)
    results, solution = [], None
    t0 = time.perf_counter()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1,
                                          service_workers="block")
            context.set_default_timeout(timeout_ms)
            # nothing leaves the machine: every non-loopback request is recorded, then aborted
            context.route("**/*", lambda route: route.continue_() if _is_loopback(route.request.url)
                          else route.abort())
            for page in pages:
                requests, http_errors, js_errors = [], [], []
                pg = context.new_page()
                pg.on("request", lambda r, acc=requests: acc.append(r.url) if not _is_loopback(r.url) else None)
                pg.on("websocket", lambda ws, acc=requests: acc.append(ws.url) if not _is_loopback(ws.url) else None)
                pg.on("response", lambda r, acc=http_errors: acc.append(f"{r.status} {r.url}")
                      if r.status >= 400 else None)
                pg.on("pageerror", lambda e, acc=js_errors: acc.append(str(e)[:300]))
                t = time.perf_counter()
                pg.goto(base + page, wait_until="load")
                m = pg.evaluate(MEASURE_JS, {"patterns": PATTERNS, "belowNative": BELOW_NATIVE})
                pg.wait_for_timeout(200)  # late requests (fonts, lazy assets)
                s = summarise(page, m, sorted(set(requests)), http_errors, js_errors)
                s["load_and_measure_s"] = round(time.perf_counter() - t, 2)
                s["has_solution"] = m["has_solution"]
                results.append(s)
                pg.close()
            first = next((r["page"] for r in results if r["has_solution"]), None)
            if first is not None:
                solution = check_solution(context, base, first, shots)
            version = browser.version
            browser.close()
    finally:
        server.shutdown()

    totals = {
        "pages": len(results),
        "tables": sum(r["tables"]["n"] for r in results),
        "tables_wider": sum(r["tables"]["n_wider"] for r in results),
        "tables_wider_in_scroll_wrapper": sum(r["tables"]["n_wider_in_scroll_wrapper"] for r in results),
        "figures": sum(r["figures"]["n"] for r in results),
        "figures_below_native": sum(r["figures"]["n_below_native"] for r in results),
        "figures_below_native_wider_than_column": sum(r["figures"]["n_below_native_wider_than_column"] for r in results),
        "figures_broken": sum(r["figures"]["n_broken"] for r in results),
        "code_lines_visible": sum(r["code"]["input_lines_visible"] for r in results),
        "code_cells_visible": sum(r["code"]["input_cells_visible"] for r in results),
        "code_cells_hidden": sum(r["code"]["input_cells_hidden"] for r in results),
        "code_lines_hidden": sum(r["code"]["input_lines_hidden"] for r in results),
        "cells_input_removed": sum(r["code"]["cells_input_removed"] for r in results),
        "output_text_blocks_visible": sum(r["code"]["output_text_blocks_visible"] for r in results),
        "output_text_lines_visible": sum(r["code"]["output_text_lines_visible"] for r in results),
        "raw_markup_visible": {pt: sum(r["raw_markup"]["visible"][pt] for r in results) for pt in PATTERNS},
        "raw_markup_collapsed": {pt: sum(r["raw_markup"]["collapsed"][pt] for r in results) for pt in PATTERNS},
        "significance_stars_visible": sum(r["raw_markup"]["significance_stars"]["visible"] for r in results),
        "math_unrendered": sum(r["raw_markup"]["math_unrendered"] for r in results),
        "external": sum(r["external"]["n"] for r in results),
        "external_hosts": sorted({h for r in results for h in r["external"]["hosts"]}),
        "http_errors": sum(len(r["http_errors"]) for r in results),
        "js_errors": sum(len(r["js_errors"]) for r in results),
        "solution_check_ok": None if solution is None else solution["ok"],
    }
    report = {
        "html": str(html),
        "viewport": VIEWPORT,
        "browser": f"{chromium} (Chromium {version})",
        "playwright": playwright.__version__ if hasattr(playwright, "__version__") else _pkg_version("playwright"),
        "below_native_threshold": BELOW_NATIVE,
        "wall_s": round(time.perf_counter() - t0, 1),
        "totals": totals,
        "solution": solution,
        "pages": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print_table(report)
    print(f"\nreport: {out}")
    ok = solution is None or solution["ok"]
    return 0 if ok else 1


def _pkg_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def print_table(report: dict) -> None:
    rows = [("page", "col px", "tables wider", "figs <90%", "code lines (hidden cells)", "raw markup", "external")]
    for r in report["pages"]:
        t, f, c, rm = r["tables"], r["figures"], r["code"], r["raw_markup"]
        raw = str(rm["total_visible"]) + (f" +{rm['total_collapsed']} collapsed" if rm["total_collapsed"] else "")
        if rm["math_unrendered"]:
            raw += f", {rm['math_unrendered']} math unrendered"
        rows.append((Path(r["page"]).stem, f"{r['column_width']:.0f}",
                     f"{t['n_wider']}/{t['n']}" + (f" ({t['n_wider_in_scroll_wrapper']} scroll)" if t["n_wider_in_scroll_wrapper"] else ""),
                     f"{f['n_below_native']}/{f['n']}",
                     f"{c['input_lines_visible']} in {c['input_cells_visible']} ({c['input_cells_hidden']} hidden, {c['cells_input_removed']} removed)",
                     raw, str(r["external"]["n"])))
    tt = report["totals"]
    rows.append(("TOTAL", "", f"{tt['tables_wider']}/{tt['tables']} ({tt['tables_wider_in_scroll_wrapper']} scroll)",
                 f"{tt['figures_below_native']}/{tt['figures']}",
                 f"{tt['code_lines_visible']} in {tt['code_cells_visible']} ({tt['code_cells_hidden']} hidden, {tt['cells_input_removed']} removed)",
                 str(sum(v for p, v in tt["raw_markup_visible"].items() if p != "- **")),
                 str(tt["external"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if k == 0 or k == len(rows) - 2:
            print("  ".join("-" * w for w in widths))

    wide = [(r["page"], t) for r in report["pages"] for t in r["tables"]["wider"]]
    if wide:
        print("\nwidest tables (width - column, px):")
        for page, t in sorted(wide, key=lambda x: -x[1]["excess"])[:10]:
            print(f"  +{t['excess']:>4}  {Path(page).stem} #{t['section']} [{t['zone']}]"
                  f"{' scroll' if t['in_scroll_wrapper'] else ''}: {' | '.join(t['headers'])}")
    small = [(r["page"], f) for r in report["pages"] for f in r["figures"]["below_native"]]
    if small:
        print("\nfigures below 90% of native width (native -> displayed, column):")
        for page, f in sorted(small, key=lambda x: x[1]["ratio"])[:10]:
            print(f"  {f['ratio']:.2f}  {Path(page).stem} #{f['section']}: {f['natural_width']} -> "
                  f"{f['displayed_width']:.0f} px (column {f['column']}) {Path(f['src']).name[:24]}")
    s = report["solution"]
    if s:
        print(f"\nsolution toggle on {s['page']}: hidden before click: {not s['before']['any_body_visible']}, "
              f"shown after: {s['after']['all_body_visible']} -> {'ok' if s['ok'] else 'FAILED'}")
    else:
        print("\nno page with a solution")
    hosts = report["totals"]["external_hosts"]
    print(f"external hosts: {', '.join(hosts) if hosts else 'none'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", type=Path, default=ROOT / "book" / "_build" / "html",
                    help="the built book (default: book/_build/html)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "reports" / "pages.json",
                    help="JSON report (default: benchmarks/reports/pages.json)")
    ap.add_argument("--shots", type=Path, default=None,
                    help="folder for the solution screenshots (default: beside --out, named after it)")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium executable")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-action timeout in seconds")
    args = ap.parse_args(argv)
    html = args.html.resolve()
    if not html.is_dir():
        ap.error(f"{html} is not a folder (build the book with `make book` first)")
    out = args.out.resolve()
    shots = (args.shots or out.with_suffix("")).resolve()
    return run(html, out, shots, args.chromium, int(args.timeout * 1000))


if __name__ == "__main__":
    sys.exit(main())
