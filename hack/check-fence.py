#!/usr/bin/env python3
"""The fence, witnessed by the apiserver: after a new leader's first status write to a pool, no
status write to that pool from the old leader's pod is accepted.

    hack/check-fence.py AUDIT_LOG USERNAME OLD_POD NEW_POD [SINCE]
    hack/check-fence.py --self-test

SINCE (Unix seconds, the moment the failover was caused) leaves out what came before it: NEW_POD
may have led in an earlier term (a pod that lost the lease and got it back), and OLD_POD's writes
in its own term, after NEW_POD's earlier one, are not stale.

Reads a kube-apiserver JSON audit log (level Metadata or more). A pod's identity is the pod name
the apiserver records for a bound ServiceAccount token (user.extra
authentication.kubernetes.io/pod-name), so two replicas of one ServiceAccount are told apart, and
a restarted container keeps its pod's identity. For each DbPool the NEW_POD wrote status to
(accepted: a 2xx answer), its first such write is the start of the new term as the apiserver saw
it; any accepted status write by OLD_POD to the same pool that completed after it is stale, and
the check fails. Refused stale writes (422, status.writerEpoch must not decrease) are counted and
printed: the apiserver's half of the fence at work. Exit 0 when nothing stale was accepted and the
new leader wrote at least one status (else there is nothing to compare against: exit 1).

Lives here: reading the audit log and the comparison. Must not live here: the cluster or how a
failover is caused (hack/test-node-ops.sh).
"""

import json
import sys
from datetime import datetime, timezone

POD_NAME = "authentication.kubernetes.io/pod-name"
WRITES = {"create", "update", "patch", "delete"}


def when(ts):
    """An audit timestamp (RFC 3339, microseconds, Z) as a datetime."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def status_writes(events, username):
    """(pod, pool, completed, code) of every status write by `username` to a DbPool."""
    out = []
    for e in events:
        ref = e.get("objectRef") or {}
        user = e.get("user") or {}
        if e.get("stage") != "ResponseComplete" or user.get("username") != username:
            continue
        if e.get("verb") not in WRITES or ref.get("apiGroup") != "dbpool.io":
            continue
        if ref.get("resource") != "dbpools" or ref.get("subresource") != "status":
            continue
        pod = ((user.get("extra") or {}).get(POD_NAME) or ["?"])[0]
        pool = f"{ref.get('namespace')}/{ref.get('name')}"
        code = (e.get("responseStatus") or {}).get("code", 0)
        out.append((pod, pool, when(e["stageTimestamp"]), code))
    return out


def judge(writes, old, new, since=None):
    """(first accepted write of `new` per pool, accepted stale writes of `old`, refused ones),
    counting only writes that completed after `since` (a datetime), if given."""
    if since is not None:
        writes = [w for w in writes if w[2] >= since]
    first = {}
    for pod, pool, t, code in writes:
        if pod == new and 200 <= code < 300 and (pool not in first or t < first[pool]):
            first[pool] = t
    stale, refused = [], []
    for pod, pool, t, code in writes:
        if pod != old or pool not in first or t <= first[pool]:
            continue
        (stale if 200 <= code < 300 else refused).append((pool, t, code))
    return first, stale, refused


def read(path):
    events = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a rotation or an unfinished write
    return events


def self_test():
    def ev(pod, pool, ts, code):
        return {"stage": "ResponseComplete", "verb": "patch",
                "user": {"username": "sa", "extra": {POD_NAME: [pod]}},
                "objectRef": {"apiGroup": "dbpool.io", "resource": "dbpools",
                              "subresource": "status", "namespace": "shop", "name": pool},
                "responseStatus": {"code": code}, "stageTimestamp": ts}
    log = [ev("a", "p", "2026-01-01T00:00:01.000000Z", 200),
           ev("b", "p", "2026-01-01T00:00:05.000000Z", 200),
           ev("a", "p", "2026-01-01T00:00:06.000000Z", 422),
           ev("a", "q", "2026-01-01T00:00:06.000000Z", 200)]
    first, stale, refused = judge(status_writes(log, "sa"), "a", "b")
    assert list(first) == ["shop/p"] and not stale and len(refused) == 1, (first, stale, refused)
    log.append(ev("a", "p", "2026-01-01T00:00:07.000000Z", 200))
    _, stale, _ = judge(status_writes(log, "sa"), "a", "b")
    assert len(stale) == 1, stale
    assert not status_writes(log, "other")
    # b led before (t=5) and a's term came after it (t=7): with SINCE after a's term began, b's
    # new term's first write is the reference, and a's write before it is not stale.
    log.append(ev("b", "p", "2026-01-01T00:00:09.000000Z", 200))
    since = when("2026-01-01T00:00:08.000000Z")
    first, stale, _ = judge(status_writes(log, "sa"), "a", "b", since)
    assert first["shop/p"] == when("2026-01-01T00:00:09.000000Z") and not stale, (first, stale)
    print("check-fence self-test passed")


def main(argv):
    if argv[1:] == ["--self-test"]:
        self_test()
        return 0
    if len(argv) not in (5, 6):
        print(__doc__, file=sys.stderr)
        return 2
    path, username, old, new = argv[1:5]
    since = datetime.fromtimestamp(float(argv[5]), timezone.utc) if len(argv) == 6 else None
    first, stale, refused = judge(status_writes(read(path), username), old, new, since)
    if not first:
        print(f"no accepted status write by {new}: nothing to judge the fence by")
        return 1
    for pool, t in sorted(first.items()):
        print(f"{pool}: first status write of {new} at {t.isoformat()}")
    print(f"stale status writes of {old} refused by the apiserver: {len(refused)}")
    for pool, t, code in stale:
        print(f"STALE: {old} wrote {pool} status at {t.isoformat()} ({code}), after {new} did")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
