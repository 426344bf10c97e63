#!/usr/bin/env python3
"""The controller's shape (issue #22), checked from the source text (part of `make lint`).

Two checks, each failing with a message that states its rule:
- doors: the module graph of src/controller, derived from `use` lines and from `super::`,
  `self::` and `crate::controller::` paths (test code left out). Fails on any import circle and
  on any import against the layering declared below (LAYERS, SHARED).
- sizes: non-test lines (no blank lines, no comment-only lines, nothing in `#[cfg(test)]` items,
  no tests.rs and nothing under a tests/ folder) of every .rs file under SIZE_ROOTS. Fails on a
  function over MAX_FN_LINES (from its `fn` line to its closing brace) or a file over
  MAX_FILE_LINES, unless the file has a line `// shape: exception: <reason>`.

A name that a child module takes from mod.rs (`super::Error`) is an import of the module mod.rs
re-exports it from, or of `mod` itself when mod.rs defines it. Known limit: `super::` inside an
inline non-test `mod x { ... }` block is resolved as if written in the file's own module.

Usage: hack/check-shape.py [--only doors|sizes] [--root DIR ...] [--self-test]
Paths are relative to the repository root. stdlib only.
"""
import argparse
import os
import re
import sys
import tempfile

# ---------------------------------------------------------------------------------------------
# The rules, as data: edit these.
# ---------------------------------------------------------------------------------------------

# The folder whose modules the doors check looks at (a module = a top-level file or folder there;
# `mod` is its mod.rs).
DOORS_ROOT = "src/controller"

# Layers, top first. A module not named in any layer belongs to the last one (None = "everything
# else"). A module may import modules of lower layers; within its own layer only if the layer is
# in SAME_LAYER_OK; never a module of a higher layer.
LAYERS = [
    # Start-up, the Lease, the watches: they build the context and drive the pipeline.
    ("runtime", {"mod", "launch", "running", "leadership", "watches", "liveness"}),
    # The reconcile pipeline, which runs on the context.
    ("pipeline", {"reconcile"}),
    # The shared state and the one pool registry.
    ("context", {"context"}),
    # The rooms: each takes what it needs as arguments or small traits.
    ("subsystems", {
        "targets", "sharing", "fleet", "probe_permits", "credentials", "status", "gate", "write",
        "triggers", "pings", "timeouts",
    }),
    # The one door for writes and per-pool metrics.
    ("door", {"fence"}),
    # Words every layer may use: settings, names, errors, event wording, the API budget, locks.
    ("vocabulary", None),
]
SAME_LAYER_OK = {"runtime", "vocabulary"}

# With the vocabulary a layer of its own, no subsystem needs to reach sideways.
SHARED = set()

# The sizes check.
SIZE_ROOTS = ["src/controller", "crates/kubectl-dbpool/src"]
MAX_FN_LINES = 60
MAX_FILE_LINES = 400
EXCEPTION_RE = re.compile(r"^\s*//\s*shape:\s*exception:\s*(.*\S)\s*$")
WORST = 10  # rows of the worst-offenders table

DOORS_RULE = (
    "rule (issue #22, one-way doors): the layers, top to bottom, are\n"
    "    {layers}.\n"
    "  A module imports only modules of the layers below its own, or of its own layer when that\n"
    "  layer is one of: {same}. A subsystem never imports the context, the runtime or another\n"
    "  subsystem, except the vocabulary modules SHARED = {{{shared}}}; it takes what it needs as\n"
    "  arguments or small traits. No import circles. (LAYERS, SAME_LAYER_OK and SHARED are data\n"
    "  at the top of hack/check-shape.py; a name defined in mod.rs counts as module `mod`.)"
)
SIZES_RULE = (
    "rule (issue #22): no function over {fn} non-test lines (from its `fn` line to its closing\n"
    "  brace; blank and comment-only lines not counted) and no file over {file} non-test lines.\n"
    "  Split into short named functions (or files), or explain an exception in the file with a\n"
    "  line `// shape: exception: <reason>`."
)


# ---------------------------------------------------------------------------------------------
# Lexing: comments blanked, string and char literal contents masked, test items removed.
# ---------------------------------------------------------------------------------------------

def _is_ident(ch):
    return ch.isalnum() or ch == "_"


def mask(src):
    """The source with comments replaced by spaces and the contents of string, raw string, byte
    and char literals replaced by 'x' (whitespace and newlines kept), so that offsets and line
    numbers are unchanged and braces, quotes and paths inside literals or comments vanish."""
    out = list(src)
    n, i = len(src), 0

    def blank(a, b, keep="x"):
        for k in range(a, b):
            c = src[k]
            if c not in " \t\r\n":
                out[k] = keep
    while i < n:
        c = src[i]
        if c == "/" and src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j, " ")
            i = j
        elif c == "/" and src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j, " ")
            i = j
        elif c in "rbc" and (i == 0 or not _is_ident(src[i - 1])) and _raw_start(src, i):
            j = i + (2 if src[i] in "bc" and src[i + 1] == "r" else 1)
            hashes = 0
            while src[j] == "#":
                hashes += 1
                j += 1
            end = src.find('"' + "#" * hashes, j + 1)
            end = n if end < 0 else end
            blank(j + 1, end)
            i = end + 1 + hashes
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            blank(i + 1, min(j, n))
            i = j + 1
        elif c == "'":
            # A char literal ('x', '\n', '\u{7b}', '{') or a lifetime/label ('a, 'static).
            if i + 1 < n and src[i + 1] == "\\":
                j = src.find("'", i + 3)
                j = n if j < 0 else j
                blank(i + 1, j)
                i = j + 1
            elif i + 2 < n and src[i + 2] == "'":
                blank(i + 1, i + 2)
                i += 3
            else:
                i += 1
        elif _is_ident(c):
            j = i
            while j < n and _is_ident(src[j]):
                j += 1
            i = j
        else:
            i += 1
    return "".join(out)


def _raw_start(src, i):
    """Whether a raw string (r"", r#""#, br"", cr"") starts at i."""
    j = i
    if src[j] in "bc":
        j += 1
        if j >= len(src) or src[j] != "r":
            return False
    j += 1
    while j < len(src) and src[j] == "#":
        j += 1
    return j < len(src) and src[j] == '"'


CFG_TEST_RE = re.compile(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]")


def item_end(code, start):
    """End offset (exclusive) of the item starting at `start`: through its `;` or its matching
    closing brace, whichever comes first outside parentheses and brackets."""
    depth, i, n = 0, start, len(code)
    while i < n:
        c = code[i]
        if c == "}" and depth == 0:
            return i  # the end of the enclosing block (an attribute on a field or statement)
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == ";" and depth == 0:
            return i + 1
        elif c == "{" and depth == 0:
            return match_brace(code, i) + 1
        i += 1
    return n


def match_brace(code, open_at):
    """Offset of the brace closing the one at open_at (end of text if unbalanced)."""
    depth = 0
    for i in range(open_at, len(code)):
        if code[i] == "{":
            depth += 1
        elif code[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return len(code) - 1


def strip_tests(code):
    """The masked code with every `#[cfg(test)]` item (attribute included) blanked."""
    out = list(code)
    pos = 0
    while True:
        m = CFG_TEST_RE.search(code, pos)
        if not m:
            break
        end = item_end(code, m.end())
        for k in range(m.start(), end):
            if out[k] not in "\n":
                out[k] = " "
        pos = end
    return "".join(out)


class Source:
    """One .rs file: its path, raw text and production code (masked, tests stripped)."""

    def __init__(self, path, rel):
        self.path, self.rel = path, rel
        with open(path, encoding="utf-8") as f:
            self.text = f.read()
        self.code = strip_tests(mask(self.text))
        self._starts = [0] + [m.end() for m in re.finditer("\n", self.text)]

    def line_of(self, offset):
        lo, hi = 0, len(self._starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1


def rust_files(root):
    """(path, path relative to root) of the .rs files under root, test files left out."""
    found = []
    for dp, dns, fns in os.walk(root):
        dns[:] = sorted(d for d in dns if d != "tests")
        for f in sorted(fns):
            if f.endswith(".rs") and f != "tests.rs":
                p = os.path.join(dp, f)
                found.append((p, os.path.relpath(p, root)))
    return found


# ---------------------------------------------------------------------------------------------
# Doors: the module graph, circles and layering.
# ---------------------------------------------------------------------------------------------

def parse_use_tree(text):
    """Leaf paths of a use tree with the offset (in text) of each leaf's last segment:
    'a::{b, c::d as e}' -> [(['a','b'], None, 4), (['a','c','d'], 'e', 10)]."""
    toks = [(m.group(0), m.start()) for m in re.finditer(r"::|[{},*]|[A-Za-z_]\w*", text)]
    pos = [0]

    def peek():
        return toks[pos[0]][0] if pos[0] < len(toks) else None

    def take():
        t = toks[pos[0]] if pos[0] < len(toks) else (None, len(text))
        pos[0] += 1
        return t

    def tree(prefix):
        if peek() == "::":  # leading `::` (2015 style)
            take()
        if peek() == "{":
            take()
            leaves = []
            while peek() not in (None, "}"):
                before = pos[0]
                leaves += tree(prefix)
                if peek() == ",":
                    take()
                if pos[0] == before:
                    take()
            take()
            return leaves
        if peek() == "*":
            return [(prefix + ["*"], None, take()[1])]
        path, at = list(prefix), len(text)
        while peek() is not None and re.match(r"[A-Za-z_]", peek()):
            seg, at = take()
            path.append(seg)
            if peek() == "::":
                take()
                if peek() in ("{", "*"):
                    return tree(path)
            else:
                break
        alias = None
        if peek() == "as":
            take()
            alias = take()[0]
        return [(path, alias, at)]

    leaves = []
    while peek() is not None:
        before = pos[0]
        leaves += tree([])
        if peek() == ",":
            take()
        if pos[0] == before:
            take()
    return leaves


USE_RE = re.compile(r"(?<![\w:])use\s+([^;]*);")
PATH_RE = re.compile(
    r"(?<![\w:.])((?:crate\s*::\s*controller|super(?:\s*::\s*super)*|self)"
    r"(?:\s*::\s*(?:[A-Za-z_]\w*|\*))+)"
)
BARE_RE = re.compile(r"(?<![\w:.])([a-z_]\w*(?:\s*::\s*(?:[A-Za-z_]\w*|\*))+)")


def module_path(rel):
    """Module path inside the doors root: 'a.rs' -> ['a'], 'a/b.rs' -> ['a','b'], 'a/mod.rs' ->
    ['a'], 'mod.rs' -> []."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    return parts


def absolute(segs, here, bare_ok, modules):
    """The path `segs` as seen from module path `here`, relative to the doors root, or None when
    it leads outside (std, other crates, other parts of this crate)."""
    if segs[:2] == ["crate", "controller"]:
        return segs[2:]
    if segs and segs[0] == "super":
        base = list(here)
        while segs and segs[0] == "super":
            if not base:
                return None  # above the doors root
            base, segs = base[:-1], segs[1:]
        return base + segs
    if segs and segs[0] == "self":
        return list(here) + segs[1:]
    if bare_ok and segs and segs[0] in modules:
        return segs
    return None


def root_names(mod_src, modules):
    """Names visible at the doors root through mod.rs's use lines: name -> module (or None when it
    comes from outside)."""
    names = {}
    if mod_src is None:
        return names
    for m in USE_RE.finditer(mod_src.code):
        for segs, alias, _ in parse_use_tree(m.group(1)):
            if segs[-1] == "*":
                continue
            name = alias or (segs[-2] if segs[-1] == "self" and len(segs) > 1 else segs[-1])
            a = absolute(segs, [], True, modules)
            names[name] = a[0] if a and a[0] in modules else None
    return names


def module_graph(root):
    """(modules, edges) where edges maps (from, to) -> [(file, line), ...]."""
    files = rust_files(root)
    modules = set()
    for _, rel in files:
        p = module_path(rel)
        modules.add(p[0] if p else "mod")
    sources = [Source(p, rel) for p, rel in files]
    mod_src = next((s for s in sources if module_path(s.rel) == []), None)
    names = root_names(mod_src, modules)
    edges = {}

    def target_of(a):
        if a is None:
            return None
        if not a or a[0] == "*":
            return "mod"
        if a[0] in modules:
            return a[0]
        return names.get(a[0], "mod")  # defined in mod.rs, or re-exported from a module there

    for s in sources:
        here = module_path(s.rel)
        owner = here[0] if here else "mod"
        bare_ok = here == []
        hits = []
        use_spans = []
        for m in USE_RE.finditer(s.code):
            use_spans.append((m.start(), m.end()))
            for segs, _, at in parse_use_tree(m.group(1)):
                hits.append((m.start(1) + at, absolute(segs, here, bare_ok, modules)))
        for rx in (PATH_RE, BARE_RE) if bare_ok else (PATH_RE,):
            for m in rx.finditer(s.code):
                if any(a <= m.start() < b for a, b in use_spans):
                    continue
                segs = re.findall(r"[A-Za-z_]\w*|\*", m.group(1))
                hits.append((m.start(), absolute(segs, here, bare_ok, modules)))
        for off, a in hits:
            t = target_of(a)
            if t is not None and t != owner:
                where = (os.path.join(root, s.rel), s.line_of(off))
                lst = edges.setdefault((owner, t), [])
                if where not in lst:
                    lst.append(where)
    return modules, edges


def circles(modules, edges):
    """Strongly connected components with more than one module (Tarjan)."""
    succ = {m: sorted({b for (a, b) in edges if a == m}) for m in modules}
    for (a, b) in edges:
        succ.setdefault(b, [])
    idx, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        idx[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in idx:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], idx[w])
        if low[v] == idx[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in sorted(succ):
        if v not in idx:
            visit(v)
    return sorted(c for c in comps if len(c) > 1)


def layer_of(module, layers):
    for rank, (name, mods) in enumerate(layers):
        if mods is None or module in mods:
            return rank, name
    return len(layers) - 1, layers[-1][0]


def bad_edge(a, b, layers, shared, same_ok):
    """Why the import a -> b breaks the layering, or None."""
    ra, la = layer_of(a, layers)
    rb, lb = layer_of(b, layers)
    if rb > ra:
        return None
    if rb < ra:
        return f"upward import: {a} ({la}) imports {b} ({lb})"
    if la in same_ok or b in shared:
        return None
    return f"sideways import: {a} imports {b}, both {la}, and {b} is not in SHARED"


def check_doors(root, layers=None, shared=None, same_ok=None, out=print):
    """Prints the circles and the imports against the layering; True when there are none."""
    layers = LAYERS if layers is None else layers
    shared = SHARED if shared is None else shared
    same_ok = SAME_LAYER_OK if same_ok is None else same_ok
    modules, edges = module_graph(root)
    circ = circles(modules, edges)
    bad = []
    for (a, b), where in sorted(edges.items()):
        why = bad_edge(a, b, layers, shared, same_ok)
        if why:
            bad.append((why, where))
    for c in circ:
        out(f"doors: import circle: {' -> '.join(c)} (each imports another of them):")
        for (a, b), where in sorted(edges.items()):
            if a in c and b in c:
                out(f"    {a} -> {b}: " + ", ".join(f"{f}:{ln}" for f, ln in where))
    for why, where in bad:
        out(f"doors: {why}: " + ", ".join(f"{f}:{ln}" for f, ln in where))
    summary = (f"doors: {root}: {len(modules)} modules, {len(edges)} import edges, "
               f"{len(circ)} circle(s), {len(bad)} edge(s) against the layering")
    out(summary)
    if circ or bad:
        layer_text = "\n    > ".join(
            f"{n} ({', '.join(sorted(m)) if m is not None else 'everything else'})"
            for n, m in layers)
        out(DOORS_RULE.format(layers=layer_text, same=", ".join(sorted(same_ok)) or "none",
                              shared=", ".join(sorted(shared))))
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Sizes: functions and files.
# ---------------------------------------------------------------------------------------------

FN_RE = re.compile(r"(?<![\w])fn\s+(r#)?([A-Za-z_]\w*)")


def functions(src):
    """(name, first line, code lines) of every function with a body in the production code."""
    code = src.code
    code_lines = [bool(line.strip()) for line in code.split("\n")]
    found = []
    for m in FN_RE.finditer(code):
        depth, i, n = 0, m.end(), len(code)
        body = None
        while i < n:
            c = code[i]
            if c in "([":
                depth += 1
            elif c in ")]":
                depth -= 1
            elif depth == 0 and c == ";":
                break
            elif depth == 0 and c == "{":
                body = i
                break
            i += 1
        if body is None:
            continue
        first, last = src.line_of(m.start()), src.line_of(match_brace(code, body))
        found.append((m.group(2), first, sum(code_lines[first - 1:last])))
    return found


def check_sizes(roots, max_fn=None, max_file=None, out=print, worst=None):
    """Prints the functions and files over the limits, the exceptions and a table of the worst
    offenders; True when nothing is over a limit outside an exception."""
    max_fn = MAX_FN_LINES if max_fn is None else max_fn
    max_file = MAX_FILE_LINES if max_file is None else max_file
    worst = WORST if worst is None else worst
    fns, files, notes, failures = [], [], [], []
    for root in roots:
        for path, rel in rust_files(root):
            s = Source(path, rel)
            exc = next((m.group(1) for m in map(EXCEPTION_RE.match, s.text.split("\n")) if m),
                       None)
            size = sum(1 for line in s.code.split("\n") if line.strip())
            files.append((size, path, exc))
            long_fns = []
            for name, line, count in functions(s):
                fns.append((count, f"{path}:{line}", name, exc))
                if count > max_fn:
                    long_fns.append(f"fn {name} at {path}:{line} has {count} lines "
                                    f"(max {max_fn})")
            over = [f"file {path} has {size} lines (max {max_file})"] if size > max_file else []
            if exc is not None:
                if over or long_fns:
                    notes.append(f"sizes: note: exception in {path} ({exc}): "
                                 + "; ".join(over + long_fns))
            else:
                failures += over + long_fns
    for f in failures:
        out(f"sizes: {f}")
    for n in notes:
        out(n)
    fns.sort(key=lambda r: (-r[0], r[1]))
    files.sort(key=lambda r: (-r[0], r[1]))
    out(f"sizes: {', '.join(roots)}: {len(files)} files, {len(fns)} functions; worst offenders:")
    out(f"    {'lines':>5}  {'max':>4}  {'function':<28} where")
    for count, where, name, exc in fns[:worst]:
        flag = " (exception)" if exc is not None and count > max_fn else (
            "  OVER" if count > max_fn else "")
        out(f"    {count:>5}  {max_fn:>4}  {name:<28} {where}{flag}")
    out(f"    {'lines':>5}  {'max':>4}  file")
    for size, path, exc in files[:worst]:
        flag = " (exception)" if exc is not None and size > max_file else (
            "  OVER" if size > max_file else "")
        out(f"    {size:>5}  {max_file:>4}  {path}{flag}")
    if failures:
        out(SIZES_RULE.format(fn=max_fn, file=max_file))
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Self-test on inline fixtures.
# ---------------------------------------------------------------------------------------------

def _write(root, files):
    for rel, text in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)


def _body(n, indent="    "):
    return "".join(f"{indent}let v{k} = {k};\n" for k in range(n))


def self_test():
    failures = []
    checks = [0]

    def expect(what, cond):
        checks[0] += 1
        if not cond:
            failures.append(what)

    def run(fn, *a, **kw):
        lines = []
        ok = fn(*a, out=lines.append, **kw)
        return ok, "\n".join(lines)

    layers = [("runtime", {"leadership", "watches", "mod"}),
              ("context", {"context", "reconcile"}), ("subsystems", None)]
    with tempfile.TemporaryDirectory() as tmp:
        # Doors: a circle (mod -> leadership -> watches -> mod, through a name defined in mod.rs).
        d = os.path.join(tmp, "circle")
        _write(d, {
            "mod.rs": "mod leadership;\nmod watches;\npub use leadership::Gate;\n"
                      "pub enum Error {}\n",
            "leadership.rs": "use super::watches::run;\npub struct Gate;\n",
            "watches.rs": "use super::{Error, config::Settings};\npub fn run() {}\n",
            "config.rs": "pub struct Settings;\n",
        })
        ok, text = run(check_doors, d, layers, {"config"}, {"runtime", "context"})
        expect("a circle fails", not ok)
        expect("the circle names its modules", "import circle: leadership -> mod -> watches" in text)
        expect("the circle shows file:line", "watches.rs:1" in text)
        expect("the message states the rule", "rule (issue #22, one-way doors)" in text)
        # Doors: an upward and a sideways import; comments, strings and tests do not count.
        d = os.path.join(tmp, "upward")
        _write(d, {
            "mod.rs": "mod context;\nmod targets;\nmod fleet;\nmod config;\nmod reconcile;\n"
                      "pub use config::FIELD_MANAGER;\n",
            "context.rs": "use super::targets::Targets;\npub fn lock() {}\n",
            "targets.rs": "use super::{context::lock, FIELD_MANAGER};\n"
                          "// see super::fleet for more\n"
                          "const S: &str = \"super::fleet::X\";\n"
                          "const R: &str = r#\"super::fleet\"#;\n"
                          "pub struct Targets;\n"
                          "#[cfg(test)]\nmod tests {\n    use crate::controller::fleet::Fleet;\n}\n",
            "fleet.rs": "pub struct Fleet;\npub fn f() { crate::controller::targets::Targets; }\n",
            "config.rs": "pub const FIELD_MANAGER: &str = \"x\";\n",
            "tests.rs": "use super::fleet::Fleet;\n",
            "reconcile.rs": "mod outbox;\npub struct Run;\n",
            "reconcile/outbox.rs": "use super::Run;\nuse super::super::context::lock;\n",
            "tests/more.rs": "use super::super::fleet::Fleet;\n",
        })
        ok, text = run(check_doors, d, layers, {"config"}, {"runtime", "context"})
        expect("an upward import fails", not ok)
        expect("upward edge reported with file:line",
               "upward import: targets (subsystems) imports context (context)" in text
               and "targets.rs:1" in text)
        expect("sideways edge reported", "sideways import: fleet imports targets" in text
               and "fleet.rs:2" in text)
        expect("shared module allowed (via mod.rs re-export)", "imports config" not in text)
        expect("comments, strings and raw strings ignored",
               "targets imports fleet" not in text)
        expect("test code ignored", "targets.rs:9" not in text and "more.rs" not in text)
        expect("nested file: own module internal, grandparent path resolved",
               "reconcile -> reconcile" not in text and "reconcile (context) imports" not in text)
        expect("context -> subsystem allowed", "context (context) imports" not in text)
        # Sizes.
        d = os.path.join(tmp, "sizes")
        _write(d, {
            "long.rs": "// shape check fixture\n"
                       "fn long() {\n" + _body(59) + "}\n"
                       "fn fine() {\n" + _body(58) + "\n    // a comment\n\n}\n",
            "braces.rs": "fn strings<'a>(x: &'a str) -> char {\n"
                         "    let s = \"}}}{\";\n"
                         "    let r = r#\"raw } \" {{ \"#;\n"
                         "    let b = br\"}\";\n"
                         "    /* a } /* nested { */ } */\n"
                         "    let c = '{';\n"
                         "    let e = '\\'';\n"
                         "    '}'\n"
                         "}\n"
                         "fn after() {\n" + _body(61) + "}\n",
            "tested.rs": "fn small() {}\n#[cfg(test)]\nmod tests {\n"
                         "    fn huge() {\n" + _body(100, "        ") + "    }\n}\n",
            "big.rs": "".join(f"fn f{k}() {{ let x = \"{{\"; }}\n" for k in range(401)),
            "excused.rs": "// shape: exception: generated table, one line per entry\n"
                          "fn table() {\n" + _body(70) + "}\n",
            "tests/skip.rs": "fn skipped() {\n" + _body(100) + "}\n",
            "trait.rs": "trait T {\n    fn decl(&self);\n    fn ptr(f: fn(u8) -> u8);\n}\n",
        })
        ok, text = run(check_sizes, [d], 60, 400, worst=50)
        expect("a long function fails", not ok)
        expect("61-line fn reported", re.search(r"fn long at \S+long.rs:2 has 61 lines", text))
        expect("60-line fn (comments/blank lines not counted) passes", "fn fine at" not in text)
        expect("braces in strings/raw strings/chars/comments do not end a function",
               re.search(r"fn after at \S+braces.rs:10 has 63 lines", text)
               and re.search(r"\s8\s+60\s+strings\s", text))
        expect("cfg(test) items not counted", "huge" not in text)
        expect("file over the limit fails", re.search(r"file \S+big.rs has 401 lines", text))
        expect("exception noted, not failed", "fn table at" not in text.split("note:")[0]
               and "exception in" in text and "generated table" in text)
        expect("tests/ folder skipped", "skipped" not in text)
        expect("declarations without a body skipped", " decl " not in text)
        expect("the message states the rule", "rule (issue #22): no function over 60" in text)
        d = os.path.join(tmp, "clean")
        _write(d, {"a.rs": "fn a() {\n" + _body(58) + "}\n", "b/c.rs": "fn c() {}\n"})
        ok, _ = run(check_sizes, [d], 60, 400)
        expect("a clean tree passes", ok)
    for f in failures:
        print(f"self-test: FAILED: {f}")
    print(f"self-test: {checks[0] - len(failures)}/{checks[0]} checks passed")
    return not failures


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["doors", "sizes"])
    ap.add_argument("--root", action="append",
                    help=f"folder to check (repeatable); doors: the first (default {DOORS_ROOT}), "
                         f"sizes: all (default {' '.join(SIZE_ROOTS)})")
    ap.add_argument("--self-test", action="store_true", help="run on inline fixtures")
    args = ap.parse_args()
    if args.self_test:
        sys.exit(0 if self_test() else 1)
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ok = True
    if args.only in (None, "doors"):
        ok = check_doors(args.root[0] if args.root else DOORS_ROOT) and ok
    if args.only in (None, "sizes"):
        ok = check_sizes(args.root or SIZE_ROOTS) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
