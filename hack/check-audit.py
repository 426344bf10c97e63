#!/usr/bin/env python3
"""Checks the API calls one ServiceAccount made (from a kube-apiserver JSON audit log) against the
RBAC rules granted to it.

    hack/check-audit.py AUDIT_LOG USERNAME NAMESPACE CLUSTERROLE_JSON ROLE_JSON...
    hack/check-audit.py --self-test

Every resource request by USERNAME must be allowed by a rule of the ClusterRole (any namespace) or
of a Role (NAMESPACE only), resourceNames included, and none may have been refused (403). Every
granted (group, resource, verb) must be used, or be listed in UNUSED_BY_DESIGN with its reason.
Requests to non-resource URLs (discovery, /version) are left out: every authenticated user may
make them (system:discovery), the chart grants none.

Lives here: the audit log's reading and the comparison. Must not live here: the cluster (that is
hack/cluster.sh) or the rules themselves (the chart's templates).
"""

import json
import sys

# Granted rules a short test run need not exercise, each with why the operator needs it.
UNUSED_BY_DESIGN = {
    ("events.k8s.io", "events", "patch"):
        "kube-runtime's Recorder patches an event that repeats into a series (count, lastObservedTime)",
    # Found by this test: nothing in src/ calls get on a DbPool or its status (the pools come from
    # the list+watch cache, writes are server-side apply patches). Candidates for removal from
    # the chart (and its README's table), left until the controller's restructuring settles.
    ("dbpool.io", "dbpools", "get"):
        "no caller in src/ today: candidate for removal",
    ("dbpool.io", "dbpools/status", "get"):
        "no caller in src/ today: candidate for removal",
    # spec.gate (gates.enabled; hack/test-node.sh installs with it).
    ("", "services", "create"):
        "a server-side apply that makes the gate Service is authorized as create; the audit log records it as patch",
    ("discovery.k8s.io", "endpointslices", "create"):
        "a server-side apply that makes the gate's EndpointSlice is authorized as create; the audit log records it as patch",
    ("", "services", "delete"):
        "a gate the spec no longer declares is deleted (uid precondition); the test never drops one",
    ("discovery.k8s.io", "endpointslices", "delete"):
        "the slice of a gate the spec no longer declares is deleted the same way",
}


def load_rules(path, cluster_wide):
    """(rule, cluster_wide) pairs of a Role or ClusterRole JSON object."""
    with open(path) as f:
        role = json.load(f)
    return [(r, cluster_wide) for r in role.get("rules", [])]


def requests(lines, user):
    """The resource requests of user: dicts with group, resource, verb, namespace, name, code."""
    out = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        e = json.loads(line)
        # A watch is logged when it starts (ResponseStarted) and again only when it ends.
        if e.get("user", {}).get("username") != user or e.get("stage") not in ("ResponseStarted", "ResponseComplete"):
            continue
        ref = e.get("objectRef")
        if not ref:
            continue
        resource = ref.get("resource", "")
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        out.append({
            "group": ref.get("apiGroup", ""),
            "resource": resource,
            "verb": e.get("verb"),
            "namespace": ref.get("namespace", ""),
            "name": ref.get("name", ""),
            "code": e.get("responseStatus", {}).get("code", 0),
        })
    return out


def allows(rule, cluster_wide, namespace, req):
    """Whether one rule allows one request."""
    if not cluster_wide and req["namespace"] != namespace:
        return False
    groups, resources, verbs = rule.get("apiGroups", []), rule.get("resources", []), rule.get("verbs", [])
    names = rule.get("resourceNames", [])
    return ((req["group"] in groups or "*" in groups)
            and (req["resource"] in resources or "*" in resources)
            and (req["verb"] in verbs or "*" in verbs)
            and (not names or req["name"] in names))


def check(reqs, rules, namespace):
    """(problems, used triples, unused granted triples not explained)."""
    problems, used = [], set()
    for req in reqs:
        triple = (req["group"], req["resource"], req["verb"])
        used.add(triple)
        if req["code"] == 403:
            problems.append(f"refused (403): {triple} {req['namespace']}/{req['name']}")
        if not any(allows(r, cw, namespace, req) for r, cw in rules):
            problems.append(f"not granted by the chart: {triple} {req['namespace']}/{req['name']}")
    granted = {(g, res, v) for r, _ in rules for g in r.get("apiGroups", [])
               for res in r.get("resources", []) for v in r.get("verbs", [])}
    unused = sorted(t for t in granted - used if t not in UNUSED_BY_DESIGN)
    for t in unused:
        problems.append(f"granted but neither used nor explained in UNUSED_BY_DESIGN: {t}")
    return problems, used, granted - used


def self_test():
    """The comparison on a small log."""
    ev = lambda verb, res, name="", ns="a", code=200, sub="": json.dumps({
        "stage": "ResponseComplete", "verb": verb, "user": {"username": "u"},
        "objectRef": {"resource": res, "apiGroup": "g", "namespace": ns, "name": name,
                      **({"subresource": sub} if sub else {})}, "responseStatus": {"code": code}})
    rules = [({"apiGroups": ["g"], "resources": ["r"], "verbs": ["get"], "resourceNames": ["x"]}, False),
             ({"apiGroups": ["g"], "resources": ["r/status"], "verbs": ["patch"]}, True)]
    reqs = requests([ev("get", "r", "x"), ev("patch", "r", sub="status", ns="b")], "u")
    assert check(reqs, rules, "a")[0] == [], check(reqs, rules, "a")
    reqs = requests([ev("get", "r", "y"), ev("patch", "r", sub="status", ns="b", code=403)], "u")
    assert len(check(reqs, rules, "a")[0]) == 2, check(reqs, rules, "a")
    reqs = requests([ev("patch", "r", sub="status")], "u")
    assert len(check(reqs, rules, "a")[0]) == 1  # get on r unused, unexplained
    print("check-audit self-test: ok")


def main(argv):
    if argv[1:] == ["--self-test"]:
        self_test()
        return 0
    log, user, namespace, clusterrole, *roles = argv[1:]
    rules = load_rules(clusterrole, True)
    for r in roles:
        rules += load_rules(r, False)
    with open(log) as f:
        reqs = requests(f, user)
    if not reqs:
        print(f"check-audit: no requests by {user} in {log}", file=sys.stderr)
        return 1
    problems, used, unused = check(reqs, rules, namespace)
    print(f"check-audit: {len(reqs)} requests by {user}; used: "
          + ", ".join("/".join(filter(None, t[:2])) + ":" + t[2] for t in sorted(used)))
    for t in sorted(unused):
        if t in UNUSED_BY_DESIGN:
            print(f"check-audit: granted, not used in this run: {t}: {UNUSED_BY_DESIGN[t]}")
    for p in problems:
        print("check-audit: " + p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
