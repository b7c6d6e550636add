"""A plan, or a revision history, as one self-contained HTML page: no network, no CDN.

The page holds its data as JSON and draws it with a little inlined JavaScript: the source
tree on the left, the target tree on the right, numbered siblings folded into one row
(`layers.{0..31}`) and opened on a click, children made only when opened (a 100,000-key
MoE plan draws its first screen from a dozen rows). A line joins each visible source to
its target, coloured by the rule that sent it, with the ops and the shapes on it.
"""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING, Any

from .report import shape_change

if TYPE_CHECKING:
    from .history import History
    from .plan import Plan

# one colour per rule, by its number (rules beyond these reuse them)
PALETTE = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#17becf",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#7f7f7f",
]


def _ops(plan: Plan) -> dict[int, str]:
    """For each value an op made: the ops that made it from the file's tensors, as text."""
    from .rules import arg_text

    made_by = {out: step for step in plan.steps for out in step.outputs}
    memo: dict[int, str] = {}

    def text(v: int) -> str:
        if v not in memo:
            step = made_by.get(v)
            if step is None:
                memo[v] = ""
            else:
                before = text(step.inputs[0]) if step.inputs else ""
                op = f"{step.op}({', '.join(arg_text(a) for a in step.args)})"
                memo[v] = f"{before} | {op}" if before else op
        return memo[v]

    return {v: text(v) for v in made_by}


def plan_data(plan: Plan, title: str) -> dict[str, Any]:
    """What the plan page draws, as plain JSON."""
    ops = _ops(plan)
    shapes = {e.source: e.shape for e in plan.sources}
    edges: list[dict[str, Any]] = []
    for o in plan.outputs:
        status = o.reason if o.status != "loaded" and o.reason else o.status
        edges.append(
            {
                "s": o.sources,
                "t": o.target,
                "st": status,
                "rs": o.rules,
                "op": ops.get(o.value, ""),
                "sh": shape_change([shapes[s] for s in o.sources if s in shapes], o.shape),
            }
        )
    for e in plan.sources:
        if e.reason == "skip":
            edges.append(
                {"s": [e.source], "t": None, "st": "skipped", "rs": e.rules, "op": "", "sh": ""}
            )
    marks: dict[str, str] = {}  # target key -> what became of it, where not loaded
    for t in plan.targets or ():
        if t.status != "loaded" or t.reason == "tied":  # its provider failed: not missing
            marks[t.target] = (
                t.reason if t.reason in ("tied", "init", "mismatch", "failed") else t.status
            )
    return {
        "title": title,
        "fingerprint": plan.fingerprint,
        "ok": plan.ok,
        "rules": [{"id": r.id, "text": r.text, "where": str(r.span or "")} for r in plan.rules],
        "unused": plan.unused_rules,
        "problems": [
            {"severity": p.severity, "code": p.code, "message": p.message} for p in plan.problems
        ],
        "edges": edges,
        "targets": sorted({t.target for t in plan.targets or ()}),
        "marks": marks,
        "palette": PALETTE,
    }


def history_data(history: History, title: str) -> dict[str, Any]:
    """A revision history as the page draws it: revisions, parents, what each changes."""
    summaries = {s.revision: s for s in history.check()}
    revisions = []
    for rev in history.order:
        s = summaries[rev]
        revisions.append(
            {
                "id": rev,
                "parents": list(s.parents),
                "head": rev == history.head,
                "said": f"{s.tensors} tensors"
                if not s.parents
                else ", ".join(f"{n} {k}" for k, n in s.changes.items() if n) or "no change",
            }
        )
    return {"title": title, "revisions": revisions, "palette": PALETTE}


def render(kind: str, data: dict[str, Any]) -> str:
    """The page: its data inlined as JSON, `<`, `>` and `&` escaped (a key can hold
    `</script>` or `<!--<script>`, which would end or swallow the script)."""
    blob = (  # no `<`, `>` or `&` at all: no text in the data can end or open a script
        json.dumps(data, separators=(",", ":"))
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>\n"
        f"<title>{html.escape(data['title'])}</title>\n"
        f"<style>{_CSS}</style></head>\n<body data-kind={kind}>\n"
        f'<script id=data type="application/json">{blob}</script>\n'
        f"<script>{_JS}</script>\n</body></html>\n"
    )


def plan_page(plan: Plan, title: str = "ckptmap plan") -> str:
    return render("plan", plan_data(plan, title))


def history_page(history: History, title: str = "ckptmap history") -> str:
    return render("history", history_data(history, title))


_CSS = """
body{font:13px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:10px 16px;background:#fff;border-bottom:1px solid #ddd}
h1{font-size:16px;margin:0 0 4px}
.fp{font-family:monospace;color:#666}
.problems{margin:6px 0;padding:6px 10px;background:#fff4f4;border:1px solid #e8b4b4}
.problems.none{background:#f2fbf2;border-color:#b4dcb4}
.problems li{font-family:monospace;white-space:pre-wrap}
.warning{color:#8a6d00}.error{color:#b00020}
#rules{display:flex;flex-wrap:wrap;gap:4px;margin:6px 0}
.rule{font-family:monospace;padding:2px 6px;border-radius:3px;border:2px solid;cursor:pointer;
background:#fff}
.rule.on{color:#fff}.rule.unused{border-style:dashed;opacity:.7}
#tools{display:flex;gap:8px;align-items:center}
.unused-rules{margin:4px 0}.unused-rules summary{cursor:pointer;color:#666}
.unused-rules .rule{margin:2px}
#search{width:320px;padding:3px 6px}
main{display:grid;grid-template-columns:1fr 260px 1fr;position:relative;padding:8px 16px}
.tree{font-family:monospace;background:#fff;border:1px solid #ddd;padding:4px 0;min-width:0}
.tree h2{font:600 13px system-ui;margin:2px 8px 6px}
.row{padding:1px 6px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;cursor:default}
.row.branch{cursor:pointer}
.row .tw{display:inline-block;width:1em;color:#888}
.row .n{color:#888;font-size:11px;margin-left:6px}
.kids{margin-left:14px}
.row.hl{background:#fff3b0}.row.part{background:#fffbe0}
.row.found{outline:2px solid #2a7ae2}
.m{font-size:10px;padding:0 4px;border-radius:2px;margin-left:6px;color:#fff}
.m-skipped{background:#888}.m-missing{background:#b00020}.m-init{background:#2a7ae2}
.m-mismatch{background:#d9822b}.m-unexpected{background:#8e44ad}.m-failed{background:#b00020}
.m-tied{background:#16a085}.m-conflict{background:#b00020}.m-op{background:#b00020}
.m-merge{background:#b00020}.m-split{background:#b00020}.m-name{background:#b00020}
svg{position:absolute;top:0;left:0;pointer-events:none;overflow:visible}
svg path{fill:none;stroke-width:1.6;opacity:.75}
svg path.dim{opacity:.12}svg path.hl{stroke-width:3.2;opacity:1}
svg text{font:10px monospace;fill:#444}
.graph svg path.edge{stroke-width:2.5;opacity:.9}
.graph .rev{font-family:monospace;padding:3px 8px;margin:0 0 8px;background:#fff;box-sizing:border-box;
border:1px solid #ccc;border-left:6px solid;border-radius:3px;width:fit-content}
"""

_JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
D.edges = D.edges || []; D.targets = D.targets || []; D.marks = D.marks || {}; // a history has none
const colour = r => D.palette[((r % D.palette.length) + D.palette.length) % D.palette.length];
const el = (tag, cls, text) => { const e = document.createElement(tag);
  if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; };
// a segment's trailing index, up to what JavaScript holds exactly (longer runs are names)
const TRAIL = /^([^0-9]*?)(0|[1-9][0-9]{0,14})$/;
function ranges(ns) { ns.sort((a, b) => a - b); const out = []; let s = ns[0], p = ns[0];
  for (const n of ns.slice(1).concat([null])) { if (n !== null && n === p + 1) { p = n; continue; }
    out.push(s === p ? `${s}` : p === s + 1 ? `${s},${p}` : `${s}..${p}`);
    if (n !== null) { s = p = n; } }
  return "{" + out.join(",") + "}"; }

// --- trees: one node per segment; numbered siblings under one folding row --------------
let nextId = 0;
function node(seg, path, parent) { return { id: nextId++, seg, path, parent, kids: new Map(),
  leaf: false, open: false, el: null, group: null, keys: 0 }; }
function tree(keys) { const root = node("", "", null); root.open = true;
  for (const key of keys) { let cur = root; cur.keys++;
    for (const seg of key.split(".")) { let k = cur.kids.get(seg);
      if (!k) { k = node(seg, cur.path ? cur.path + "." + seg : seg, cur); cur.kids.set(seg, k); }
      cur = k; cur.keys++; }
    cur.leaf = true; cur.key = key; }
  return root; }
function groupsOf(n) { // the rows under n: siblings that differ only in a trailing number
  if (n.rows) return n.rows; //   (`3`, `layer3`, `w_3`) folded into one row per head
  const heads = new Map(), rest = [];
  for (const k of n.kids.values()) { const m = TRAIL.exec(k.seg);
    if (!m) { rest.push(k); continue; }
    if (!heads.has(m[1])) heads.set(m[1], []);
    heads.get(m[1]).push([+m[2], k]); }
  const rows = [];
  for (const [head, found] of [...heads].sort((a, b) => a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0)) {
    if (found.length < 2) { rest.push(found[0][1]); continue; }
    found.sort((a, b) => a[0] - b[0]);
    const g = { id: nextId++, group: null, isGroup: true, open: false, el: null, parent: n,
      members: found.map(f => f[1]), keys: found.reduce((s, f) => s + f[1].keys, 0),
      label: head + ranges(found.map(f => f[0])) };
    for (const f of found) f[1].group = g;
    rows.push(g); }
  rest.sort((a, b) => a.seg < b.seg ? -1 : a.seg > b.seg ? 1 : 0);
  n.rows = rows.concat(rest); return n.rows; }

const S = tree([...new Set(D.edges.flatMap(e => e.s))]);
const targetKeys = new Set(D.targets);
for (const e of D.edges) if (e.t !== null) targetKeys.add(e.t);
for (const k of Object.keys(D.marks)) targetKeys.add(k);
const T = tree([...targetKeys]);
// no prototype: a key named `constructor` or `__proto__` is a key like any other
const sourceMarks = Object.create(null), targetMarks = Object.assign(Object.create(null), D.marks);
const movedBy = new Map();
for (const e of D.edges) {
  if (e.st !== "loaded") for (const s of e.s) sourceMarks[s] = e.st;
  if (e.t !== null && e.st !== "loaded" && e.st !== "skipped" && !(e.t in targetMarks))
    targetMarks[e.t] = e.st;
  for (const r of e.rs) { if (!movedBy.has(r)) movedBy.set(r, new Set());
    const m = movedBy.get(r); for (const s of e.s) m.add("s:" + s); if (e.t !== null) m.add("t:" + e.t); } }

function rowFor(n, side, marks) {
  const r = el("div", "row"); n.el = r; r._node = n; r.dataset.side = side;
  const branch = n.isGroup || !n.leaf || n.kids.size;
  const tw = el("span", "tw", branch ? (n.open ? "▾" : "▸") : ""); r.append(tw);
  r.append(el("span", "", n.isGroup ? n.label : n.seg));
  if (n.leaf) { r.dataset.key = n.key;
    if (marks[n.key]) r.append(el("span", "m m-" + marks[n.key], marks[n.key])); }
  if (branch) r.append(el("span", "n", `${n.keys}`));
  if (branch) { r.classList.add("branch"); r.onclick = ev => { ev.stopPropagation(); toggle(n, side, marks); }; }
  return r; }
function childrenOf(n) { return n.isGroup ? n.members : groupsOf(n); }
function fill(box, n, side, marks) { for (const k of childrenOf(n)) { box.append(rowFor(k, side, marks));
    const kids = el("div", "kids"); kids.hidden = true; k.box = kids; box.append(kids); } }
function toggle(n, side, marks, open) {
  n.open = open === undefined ? !n.open : open;
  if (n.open && !n.filled) { fill(n.box, n, side, marks); n.filled = true; }
  n.box.hidden = !n.open; n.el.querySelector(".tw").textContent = n.open ? "▾" : "▸";
  schedule(); }
function visible(root, key) { // the row standing for a key: the deepest one drawn
  let cur = root;
  for (const seg of key.split(".")) { if (cur !== root && !cur.open) return cur;
    const k = cur.kids.get(seg); if (k.group && !k.group.open) return k.group; cur = k; }
  return cur; }

// --- the page -----------------------------------------------------------------------------
let head = null;

function drawPlan() {
  const fp = el("div", "fp", `${D.fingerprint}  ·  ${D.edges.length} entries  ·  ${D.ok ? "ok" : "has errors"}`);
  head.append(fp);
  const probs = el("div", "problems" + (D.problems.length ? "" : " none"));
  if (!D.problems.length) probs.textContent = "no problems";
  else { const ul = el("ul"); for (const p of D.problems) {
      const li = el("li", p.severity, `${p.severity}[${p.code}]: ${p.message}`); ul.append(li); }
    probs.append(ul); }
  head.append(probs);
  const rules = el("div"); rules.id = "rules";
  const unused = new Set(D.unused);
  const idle = el("details", "unused-rules");
  idle.append(el("summary", "", `${unused.size} unused rule${unused.size === 1 ? "" : "s"}`));
  for (const r of D.rules) { const b = el("span", "rule" + (unused.has(r.id) ? " unused" : ""), r.text);
    b.title = r.where; b.dataset.rule = r.id; b.style.borderColor = colour(r.id);
    b.onmouseenter = () => { if (sticky === null) highlight(r.id); };
    b.onmouseleave = () => { if (sticky === null) highlight(null); };
    b.onclick = () => { sticky = sticky === r.id ? null : r.id; highlight(sticky); };
    (unused.has(r.id) ? idle : rules).append(b); }
  head.append(rules);
  if (unused.size) head.append(idle);
  const tools = el("div"); tools.id = "tools";
  const search = el("input"); search.id = "search"; search.placeholder = "search keys";
  const found = el("span", "n"); tools.append(search, found);
  if (S.keys + T.keys <= 20000) { const all = el("button", "", "expand all"); all.id = "expand";
    all.onclick = () => expandAll(); tools.append(all); }
  head.append(tools);
  let timer = null;
  search.oninput = () => { clearTimeout(timer); timer = setTimeout(() => find(search.value, found), 150); };
  const main = el("main"); document.body.append(main);
  const left = el("div", "tree"); left.id = "source"; left.append(el("h2", "", "source"));
  const mid = el("div"); mid.id = "lines";
  const right = el("div", "tree"); right.id = "target"; right.append(el("h2", "", "target"));
  main.append(left, mid, right);
  S.box = el("div"); left.append(S.box); fill(S.box, S, "s", sourceMarks); S.filled = true;
  T.box = el("div"); right.append(T.box); fill(T.box, T, "t", targetMarks); T.filled = true;
  svg = document.createElementNS("http://www.w3.org/2000/svg", "svg"); main.append(svg);
  window.addEventListener("resize", schedule);
  schedule(); }

let svg = null, sticky = null, pending = false, current = null;
function schedule() { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; lines(); }); } }
function lines() {
  if (!svg) return;
  const main = svg.parentNode, box = main.getBoundingClientRect();
  const l = document.getElementById("source").getBoundingClientRect();
  const r = document.getElementById("target").getBoundingClientRect();
  svg.setAttribute("width", box.width); svg.setAttribute("height", main.scrollHeight);
  svg.replaceChildren();
  const seen = new Map(); // one line per pair of rows and rule
  const labelled = []; // heights of the labels drawn: none drawn over another
  for (const e of D.edges) { const rule = e.rs.length ? e.rs[e.rs.length - 1] : -1;
    const b = e.t === null ? null : visible(T, e.t);
    for (const s of e.s) { const a = visible(S, s);
      const k = `${a.id}|${b ? b.id : "x"}|${rule}`;
      let g = seen.get(k); if (!g) { g = { a, b, rule, n: 0, e }; seen.set(k, g); } g.n++; } }
  const top = el => { const b = el.getBoundingClientRect(); return b.top + b.height / 2 - box.top; };
  const drawn = []; // every position read before anything is drawn: one layout, not one a line
  for (const g of seen.values()) {
    if (!g.a.el || (g.b && !g.b.el) || g.a.el.offsetParent === null) continue;
    drawn.push([g, top(g.a.el), g.b ? top(g.b.el) : null]); }
  const out = document.createDocumentFragment(), x1 = l.right - box.left, xr = r.left - box.left;
  for (const [g, y1, yb] of drawn) {
    const x2 = g.b ? xr : x1 + 40, y2 = g.b ? yb : y1;
    const p = document.createElementNS(svg.namespaceURI, "path");
    const c = (x1 + x2) / 2;
    p.setAttribute("d", `M${x1},${y1} C${c},${y1} ${c},${y2} ${x2},${y2}`);
    p.setAttribute("stroke", g.rule < 0 ? "#999" : colour(g.rule));
    if (!g.b) p.setAttribute("stroke-dasharray", "3 3");
    p.dataset.rule = g.rule; p.dataset.count = g.n;
    if (current !== null) p.classList.add(g.rule === current || g.e.rs.includes(current) ? "hl" : "dim");
    out.append(p);
    const label = g.n > 1 ? (g.e.op ? `${g.n} x ${g.e.op}` : "") : [g.e.op, g.e.sh].filter(Boolean).join("  ");
    const ly = (y1 + y2) / 2 - 3;
    if (label && g.b && !labelled.some(y => Math.abs(y - ly) < 12)) { labelled.push(ly);
      const t = document.createElementNS(svg.namespaceURI, "text");
      t.setAttribute("x", c - 100); t.setAttribute("y", ly); t.textContent = label.slice(0, 40);
      t.dataset.rule = g.rule; out.append(t); } }
  svg.append(out); }
function highlight(rule) {
  current = rule;
  for (const b of document.querySelectorAll(".rule")) { const on = +b.dataset.rule === rule;
    b.classList.toggle("on", on); b.style.background = on ? colour(rule) : ""; }
  const moved = rule === null ? new Set() : (movedBy.get(rule) || new Set());
  const touched = new Set(); // every node and folding row above a key the rule moved
  for (const m of moved) { let cur = m[0] === "s" ? S : T;
    for (const seg of m.slice(2).split(".")) { const k = cur.kids.get(seg);
      if (k.group) touched.add(k.group.id); touched.add(k.id); cur = k; } }
  for (const row of document.querySelectorAll(".row")) {
    row.classList.remove("hl", "part");
    if (rule === null) continue;
    if (row.dataset.key !== undefined && moved.has(row.dataset.side + ":" + row.dataset.key)) row.classList.add("hl");
    else if (row.classList.contains("branch") && touched.has(row._node.id)) row.classList.add("part"); }
  schedule(); }
function openTo(root, key, side, marks) { let cur = root;
  for (const seg of key.split(".")) { const k = cur.kids.get(seg);
    if (cur !== root && !cur.open) toggle(cur, side, marks, true);
    if (k.group && !k.group.open) toggle(k.group, side, marks, true);
    cur = k; }
  return cur; }
function expandAll() {
  const walk = (n, side, marks) => { for (const k of childrenOf(n)) {
      if (k.isGroup || k.kids.size) { toggle(k, side, marks, true); walk(k, side, marks); } } };
  walk(S, "s", sourceMarks); walk(T, "t", targetMarks); highlight(current); }
function find(text, out) {
  for (const r of document.querySelectorAll(".row.found")) r.classList.remove("found");
  if (!text) { out.textContent = ""; return; }
  let n = 0;
  for (const [root, side, marks] of [[S, "s", sourceMarks], [T, "t", targetMarks]]) {
    const keys = []; (function collect(x) { if (x.leaf && x.key.includes(text)) keys.push(x.key);
      for (const k of x.kids.values()) collect(k); })(root);
    for (const key of keys) { n++; if (n > 200) continue;
      const leaf = openTo(root, key, side, marks); if (leaf.el) leaf.el.classList.add("found"); } }
  out.textContent = `${n} key${n === 1 ? "" : "s"}` + (n > 200 ? " (the first 200 opened)" : ""); }

function drawHistory() { // the graph, newest first: a node per revision, a line per parent
  const g = el("main", "graph"); g.style.display = "block"; document.body.append(g);
  const lane = new Map(), taken = new Set(); // a revision goes on its first parent's lane
  for (const r of D.revisions) { const p = r.parents[0];
    let l = p !== undefined && !taken.has(p) ? lane.get(p) : undefined;
    if (p !== undefined) taken.add(p);
    if (l === undefined) l = lane.size ? Math.max(...lane.values()) + (p === undefined ? 0 : 1) : 0;
    lane.set(r.id, l); }
  const rows = D.revisions.slice().reverse(), ROW = 34, LANE = 22;
  const width = (Math.max(0, ...lane.values()) + 1) * LANE + 12;
  const y = new Map(rows.map((r, i) => [r.id, i * ROW + ROW / 2])), x = id => 12 + lane.get(id) * LANE;
  const NS = "http://www.w3.org/2000/svg", graph = document.createElementNS(NS, "svg");
  graph.setAttribute("width", width); graph.setAttribute("height", rows.length * ROW);
  graph.style.position = "absolute"; graph.style.left = "16px"; graph.style.top = "8px";
  for (const r of rows) for (const p of r.parents) { const e = document.createElementNS(NS, "path");
    const [x1, y1, x2, y2] = [x(p), y.get(p), x(r.id), y.get(r.id)];
    e.setAttribute("d", `M${x1},${y1} C${x1},${(y1 + y2) / 2} ${x2},${(y1 + y2) / 2} ${x2},${y2}`);
    e.setAttribute("stroke", colour(lane.get(r.id))); e.classList.add("edge");
    e.dataset.from = p; e.dataset.to = r.id; graph.append(e); }
  for (const r of rows) { const c = document.createElementNS(NS, "circle");
    c.setAttribute("cx", x(r.id)); c.setAttribute("cy", y.get(r.id)); c.setAttribute("r", r.head ? 7 : 5);
    c.setAttribute("fill", colour(lane.get(r.id))); graph.append(c); }
  g.style.position = "relative"; g.append(graph);
  for (const r of rows) { const b = el("div", "rev");
    b.dataset.revision = r.id; b.style.borderLeftColor = colour(lane.get(r.id));
    b.style.marginLeft = `${width + 8}px`; b.style.height = `${ROW - 8}px`;
    b.textContent = `${r.head ? "@ " : ""}${r.id}  ${r.parents.length ? (r.parents.length > 1 ? "merge of " : "from ") + r.parents.join(", ") + ": " : "base, "}${r.said}`;
    g.append(b); } }

head = el("header");
head.append(el("h1", "", D.title));
document.body.append(head);
if (document.body.dataset.kind === "history") drawHistory(); else drawPlan();

window.ckptmap = { expandAll, highlight, find,
  highlighted: () => [...document.querySelectorAll(".row.hl")].map(r => r.dataset.side + ":" + r.dataset.key),
  keys: () => [...document.querySelectorAll(".row[data-key]")].map(r => r.dataset.side + ":" + r.dataset.key),
  lines: () => svg ? svg.querySelectorAll("path").length : 0 };
"""
