#!/usr/bin/env python3
"""Checks the PromQL of the Grafana dashboard (charts/dbpool-operator/dashboards/dbpool.json).

    hack/dashboard-queries.py check                  # static, no Prometheus (part of `make test`):
        the JSON parses; panels have unique ids, a grid position, the ${datasource} variable and a
        query each; every query (panel targets and the label_values of the template variables)
        names only metrics and labels src/metrics.rs exports (hack/metrics_catalog.py), and,
        written as recording rules with the variables substituted, passes `promtool check rules`.
    hack/dashboard-queries.py list                   # the substituted queries, one a line
    hack/dashboard-queries.py query URL [--namespace NS] [--pool NAME] [--rate-interval 1m]
        runs every query against the Prometheus at URL (GET /api/v1/query) and fails when one
        errors or returns no data; for an end-to-end test against a real Prometheus.

Grafana variables are substituted as Grafana would for "All": $namespace and $pool become `.*`
(or the regex-escaped value given), $__rate_interval and $__interval the --rate-interval (1m),
$__range 1h. Standard library only (plus promtool for `check`).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import metrics_catalog  # noqa: E402

DASHBOARD = os.path.join(os.path.dirname(HERE), "charts", "dbpool-operator", "dashboards", "dbpool.json")
DATASOURCE_UID = "${datasource}"


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def panels_of(dash):
    """Every panel, rows' collapsed panels included."""
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", [])


def queries(dash):
    """[(where, raw expression)] for every panel target and query variable."""
    out = []
    for p in panels_of(dash):
        for t in p.get("targets", []):
            out.append((f'panel {p.get("id")} "{p.get("title")}" {t.get("refId")}', t.get("expr", "")))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query", "") if isinstance(q, dict) else (q or "")
            out.append((f'variable {v["name"]}', q))
    return out


def as_promql(expr):
    """label_values(m, l) (a Grafana function) as the PromQL series query behind it."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", expr, re.S)
    return f"group by ({m.group(2)}) ({m.group(1)})" if m else expr


def regex_value(value):
    """A literal value as a PromQL regex inside a double-quoted string (`.` -> `\\.`)."""
    return re.sub(r"([.\\+*?()\[\]{}|^$])", r"\\\\\1", value)


def substitute(expr, namespace=None, pool=None, rate_interval="1m"):
    values = {
        "namespace": regex_value(namespace) if namespace else ".*",
        "pool": regex_value(pool) if pool else ".*",
        "__rate_interval": rate_interval,
        "__interval": rate_interval,
        "__range": "1h",
    }

    def repl(m):
        name = m.group(1) or m.group(2)
        if name not in values:
            raise SystemExit(f"dashboard: unknown variable ${name} in {expr}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, as_promql(expr))


def static_check(path):
    dash = load(path)
    errors = []
    names = metrics_catalog.catalog()
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    for needed in ("datasource", "namespace", "pool"):
        if needed not in variables:
            errors.append(f"template variable {needed} missing")
    ids = [p.get("id") for p in panels_of(dash)]
    if len(ids) != len(set(ids)):
        errors.append(f"panel ids are not unique: {ids}")
    for p in panels_of(dash):
        if p.get("type") == "row":
            continue
        where = f'panel {p.get("id")} "{p.get("title")}"'
        if not {"x", "y", "w", "h"} <= set(p.get("gridPos", {})):
            errors.append(f"{where}: gridPos incomplete")
        if p.get("datasource", {}).get("uid") != DATASOURCE_UID:
            errors.append(f"{where}: datasource is not {DATASOURCE_UID}")
        if not p.get("targets"):
            errors.append(f"{where}: no query")
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid") != DATASOURCE_UID:
                errors.append(f"{where} {t.get('refId')}: datasource is not {DATASOURCE_UID}")
    all_queries = queries(dash)
    for where, expr in all_queries:
        if not expr.strip():
            errors.append(f"{where}: empty query")
            continue
        for m in re.finditer(r"\$\{(\w+)|\$(\w+)", expr):
            name = m.group(1) or m.group(2)
            if not name.startswith("__") and name not in variables:
                errors.append(f"{where}: undefined variable ${name}")
        errors.extend(f"{where}: {p}" for p in metrics_catalog.problems(expr, names))
    if errors:
        for e in errors:
            print(f"dashboard: {e}", file=sys.stderr)
        return 1
    # PromQL syntax: each query as a recording rule, checked by promtool.
    with tempfile.TemporaryDirectory() as tmp:
        rules = os.path.join(tmp, "dashboard-rules.yaml")
        with open(rules, "w", encoding="utf-8") as f:
            f.write("groups:\n  - name: dashboard\n    rules:\n")
            for i, (where, expr) in enumerate(all_queries):
                f.write(f"      # {where}\n      - record: dashboard:query_{i}\n")
                f.write(f"        expr: {json.dumps(substitute(expr))}\n")
        run = subprocess.run(["promtool", "check", "rules", rules], capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stdout + run.stderr, file=sys.stderr)
            print(open(rules).read(), file=sys.stderr)
            return 1
    print(f"[dashboard] {os.path.relpath(path)}: {len(ids)} panels, {len(all_queries)} queries; "
          "metric names match src/metrics.rs; promtool check rules passed", file=sys.stderr)
    return 0


def run_queries(path, url, namespace, pool, rate_interval):
    failed = 0
    for where, expr in queries(load(path)):
        q = substitute(expr, namespace, pool, rate_interval)
        endpoint = url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": q})
        try:
            with urllib.request.urlopen(endpoint, timeout=30) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}") if e.code in (400, 422, 503) else {"error": str(e)}
        except (urllib.error.URLError, OSError, ValueError) as e:
            body = {"error": str(e)}
        result = body.get("data", {}).get("result")
        if body.get("status") != "success":
            print(f"FAIL {where}: {body.get('errorType', '')} {body.get('error', body)}\n     {q}", file=sys.stderr)
            failed += 1
        elif not result:
            print(f"FAIL {where}: no data\n     {q}", file=sys.stderr)
            failed += 1
        else:
            print(f"ok   {where}: {len(result)} series", file=sys.stderr)
    total = len(queries(load(path)))
    print(f"{total - failed} passed, {failed} failed")
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dashboard", default=DASHBOARD)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check")
    lst = sub.add_parser("list")
    q = sub.add_parser("query")
    q.add_argument("url")
    for p in (lst, q):
        p.add_argument("--namespace")
        p.add_argument("--pool")
        p.add_argument("--rate-interval", default="1m")
    args = ap.parse_args()
    if args.cmd == "check":
        return static_check(args.dashboard)
    if args.cmd == "list":
        for _, expr in queries(load(args.dashboard)):
            print(substitute(expr, args.namespace, args.pool, args.rate_interval))
        return 0
    return run_queries(args.dashboard, args.url, args.namespace, args.pool, args.rate_interval)


if __name__ == "__main__":
    sys.exit(main())
