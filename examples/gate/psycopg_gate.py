"""Connect to PostgreSQL through a DbPool's gate with psycopg: no dbpool code, no retry library.

While the DbPool's circuit breaker is closed the gate Service forwards to the database; while it
is open (or half-open) kube-proxy refuses the connect on the client's own node, at once, and no
packet reaches the database. So a request handler learns "the database is unavailable" in well
under a millisecond and can answer 503 instead of hanging in a connect timeout.

    DATABASE_URL="host=orders-gate.shop.svc port=5432 dbname=orders user=app password=..." \
        python3 psycopg_gate.py

Exit status 0: the query ran; 1: the database is unavailable (gate closed or database down).
"""

import os
import sys
import time

import psycopg

DSN = os.environ.get("DATABASE_URL", "host=orders-gate.shop.svc port=5432 dbname=orders user=app")


def main() -> int:
    started = time.perf_counter()
    try:
        # connect_timeout still matters: a refused connect is immediate, but a database that is
        # down while the breaker is still closed (before failureThreshold) is not.
        with psycopg.connect(DSN, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as err:
        elapsed_ms = (time.perf_counter() - started) * 1000
        print(f"database unavailable after {elapsed_ms:.2f} ms: {str(err).strip()}")
        return 1
    elapsed_ms = (time.perf_counter() - started) * 1000
    print(f"ok: SELECT 1 through the gate in {elapsed_ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
