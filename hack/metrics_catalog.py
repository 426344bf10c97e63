#!/usr/bin/env python3
"""The metric names the operator exports, read from src/metrics.rs, and a PromQL name check.

    hack/metrics_catalog.py                    # prints "name<TAB>type<TAB>labels" per exported series name
    hack/metrics_catalog.py check FILE...      # every dbpool_* name and matcher label in the
                                               # PromQL expressions of FILEs (rules YAML or one
                                               # expression a line) exists; exit 1 otherwise

Names follow prometheus-client's text encoding: Registry::with_prefix("dbpool") prefixes every
family, a counter's samples end in `_total`, a histogram's in `_bucket` (with `le`), `_sum` and
`_count`. Standard library only, so it runs on a fresh machine.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Labels Prometheus adds at scrape time (and the Prometheus Operator's target labels): a query may
# match on them although the operator does not export them.
TARGET_LABELS = {"instance", "job", "pod", "container", "endpoint", "service"}


def catalog(source=None):
    """{exported series name: (family type, frozenset of its labels)} from src/metrics.rs."""
    text = open(source or os.path.join(ROOT, "src", "metrics.rs"), encoding="utf-8").read()
    prefix = re.search(r'Registry::with_prefix\("([a-z_]+)"\)', text).group(1)
    structs = {}
    for name, body in re.findall(r"struct (\w+) \{(.*?)\n\}", text, re.S):
        structs[name] = {f for f in re.findall(r"^\s*(?:pub )?(\w+): \w+,", body, re.M)}
    kinds = {}  # variable -> (type, labels)
    for var, labels, kind in re.findall(r"let (\w+) = Family::<(\w+), (\w+)(?:<[^>]*>)?>", text):
        kinds[var] = (kind, structs[labels])
    for var, kind in re.findall(r"let (\w+) = (Counter|Gauge|Histogram)::default\(\)", text):
        kinds[var] = (kind, set())
    out = {}
    for family, var in re.findall(r'register\(\s*"(\w+)",\s*"(?:[^"\\]|\\.)*",\s*(\w+)\.clone\(\)', text):
        kind, labels = kinds[var]
        base = f"{prefix}_{family}"
        if kind == "Counter":
            out[base + "_total"] = ("counter", frozenset(labels))
        elif kind == "Gauge":
            out[base] = ("gauge", frozenset(labels))
        elif kind == "Histogram":
            out[base + "_bucket"] = ("histogram", frozenset(labels | {"le"}))
            out[base + "_sum"] = ("histogram", frozenset(labels))
            out[base + "_count"] = ("histogram", frozenset(labels))
        else:
            raise SystemExit(f"metrics_catalog: unknown metric type {kind} of {family}")
    if not out:
        raise SystemExit("metrics_catalog: found no registered metric in src/metrics.rs")
    return out


def problems(expr, names):
    """What is wrong with the dbpool_* names and their matchers' labels in one expression."""
    found = []
    refs = list(re.finditer(r"\b(%s_[a-zA-Z0-9_]*)\s*(\{[^}]*\})?" % "dbpool", expr))
    if not refs:
        found.append(f"uses no dbpool_* metric: {expr}")
    for ref in refs:
        name, matchers = ref.group(1), ref.group(2)
        if name not in names:
            found.append(f"unknown metric {name} (src/metrics.rs exports {', '.join(sorted(names))})")
            continue
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers or ""):
            if label not in names[name][1] | TARGET_LABELS:
                found.append(f"{name} has no label {label!r} (it has {', '.join(sorted(names[name][1]))})")
    return found


def exprs_of(path):
    text = open(path, encoding="utf-8").read()
    if path.endswith((".yaml", ".yml")):
        # Rules files written by this project: one `expr:` line each.
        return [m.strip().strip("'\"") for m in re.findall(r"^\s*expr:\s*(.+)$", text, re.M)]
    return [line for line in text.splitlines() if line.strip()]


def main(argv):
    names = catalog()
    if len(argv) > 1 and argv[1] == "check":
        bad = 0
        for path in argv[2:]:
            for expr in exprs_of(path):
                for problem in problems(expr, names):
                    print(f"{path}: {problem}", file=sys.stderr)
                    bad += 1
        return 1 if bad else 0
    for name, (kind, labels) in sorted(names.items()):
        print(f"{name}\t{kind}\t{','.join(sorted(labels))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
