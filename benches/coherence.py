#!/usr/bin/env python3
"""How long a purge made through one sidecache takes to reach another's hot tier.

Usage: coherence.py A_PROXY A_ADMIN B_PROXY TRIALS (host:port each; the route "cached" on /cached/*).
For each trial: a new path is stored through A and read back twice through B (the second read
is answered from B's hot tier), then purged through A's admin endpoint; from the purge's answer,
B is asked again and again (one keep-alive connection) until it answers a MISS. Prints the
p50, p99 and max of that time over the trials. Loopback only; bounded in trials and time.
"""
import http.client
import json
import sys
import time
import uuid

a_proxy, a_admin, b_proxy, trials = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def connect(addr):
    host, port = addr.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=5)


a, admin, b = connect(a_proxy), connect(a_admin), connect(b_proxy)
HEADERS = {"Host": "bench"}


def get(conn, path):
    conn.request("GET", path, headers=HEADERS)
    r = conn.getresponse()
    r.read()
    return r.getheader("x-cache")


run = uuid.uuid4().hex[:8]
times = []
deadline = time.monotonic() + 120
for i in range(trials):
    path = f"/cached/coherence-{run}-{i}"
    assert get(a, path) == "MISS", path
    # Until B reads it back from Redis (the write is in the background), then once from its tier.
    for _ in range(1000):
        if get(b, path) == "HIT":
            break
        time.sleep(0.001)
    assert get(b, path) == "HIT", path
    admin.request("POST", "/purge", body=json.dumps({"route": "cached", "path": path}),
                  headers={"content-type": "application/json"})
    r = admin.getresponse()
    r.read()
    assert r.status == 200, r.status
    purged = time.perf_counter()
    while get(b, path) != "MISS":
        assert time.monotonic() < deadline, "coherence: out of time"
    times.append((time.perf_counter() - purged) * 1000)
    assert time.monotonic() < deadline, "coherence: out of time"

times.sort()
pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
print(f"{len(times)} {pick(0.5):.3f} {pick(0.99):.3f} {times[-1]:.3f}")
