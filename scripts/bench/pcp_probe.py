#!/usr/bin/env python3
"""A PCP MAP probe for the HA benchmarks (loopback only).

It renews the mapping that `pcpperf map` client number CLIENT made as its K-th mapping
(same source address, nonce and internal port, option 192), so the answer shows whether
a server holds that mapping and with which external port.

  pcp_probe.py once SERVER SOURCE [--client C] [--k K]
      one MAP; prints {"result": .., "external_port": .., "epoch": .., "echoed": ..}
  pcp_probe.py failover SERVER SOURCE (--kill PID | --post ADDR/PATH) --admin ADMIN
                       [--client C] [--k K]
      SIGKILLs PID (the active), or POSTs to http://ADDR/PATH (e.g. the active's
      /ha/switchover), then sends the MAP to SERVER (the backup) every 2 ms until it is
      answered with SUCCESS; prints the time from the kill (or POST) to the answer, to
      the backup's GET /ha saying "active", and the backup's /status counts.
"""

import argparse
import ipaddress
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
import urllib.request

FIRST_INTERNAL_PORT = 10_000  # pcpperf's first internal port


def loopback(addr):
    if not ipaddress.ip_address(addr).is_loopback:
        sys.exit(f"{addr}: loopback only")
    return addr


def endpoint(s):
    host, port = s.rsplit(":", 1)
    return loopback(host), int(port)


def v4_mapped(addr):
    return b"\0" * 10 + b"\xff\xff" + socket.inet_aton(addr)


def map_request(source, client, k, lifetime=3600):
    nonce = b"pp" + struct.pack(">II", client, k) + b"pf"
    header = struct.pack(">BBHI", 2, 1, 0, lifetime) + v4_mapped(source)
    body = nonce + struct.pack(">B3xHH", 17, FIRST_INTERNAL_PORT + k, 0) + v4_mapped("0.0.0.0")
    option = struct.pack(">BBH", 192, 0, 0)
    return header + body + option


def parse(reply):
    if len(reply) < 60 or reply[1] != 0x81:
        return None
    result = reply[3]
    (epoch,) = struct.unpack(">I", reply[8:12])
    (external_port,) = struct.unpack(">H", reply[42:44])  # MAP body: nonce, proto, 3, internal port, external port
    echoed = False
    i = 60
    while i + 4 <= len(reply):
        code, _, length = struct.unpack(">BBH", reply[i : i + 4])
        echoed |= code == 192
        i += 4 + length + (-length % 4)
    return {"result": result, "external_port": external_port, "epoch": epoch, "echoed": echoed}


def get_json(admin, path):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{admin}{path}", timeout=5) as r:
        return json.load(r)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["once", "failover"])
    p.add_argument("server", type=endpoint)
    p.add_argument("source", type=loopback)
    p.add_argument("--client", type=int, default=0)
    p.add_argument("--k", type=int, default=0)
    p.add_argument("--kill", type=int)
    p.add_argument("--post")
    p.add_argument("--admin")
    a = p.parse_args()

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((a.source, 0))
    req = map_request(a.source, a.client, a.k)

    if a.mode == "once":
        sock.settimeout(2)
        sock.sendto(req, a.server)
        print(json.dumps(parse(sock.recv(2048))))
        return

    if (a.kill is None) == (a.post is None) or a.admin is None:
        sys.exit("failover needs --kill PID or --post ADDR/PATH, and --admin ADDR")
    loopback(a.admin.rsplit(":", 1)[0])
    if a.post is not None:
        loopback(a.post.split("/", 1)[0].rsplit(":", 1)[0])
    active_at = {}

    def watch_role(t0):
        while "t" not in active_at:
            try:
                if get_json(a.admin, "/ha").get("role") == "active":
                    active_at["t"] = time.monotonic() - t0
                    return
            except OSError:
                pass
            time.sleep(0.005)

    sock.settimeout(0.002)
    t0 = time.monotonic()
    if a.kill is not None:
        os.kill(a.kill, signal.SIGKILL)
    else:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        opener.open(urllib.request.Request(f"http://{a.post}", method="POST"), timeout=5).close()
    watcher = threading.Thread(target=watch_role, args=(t0,), daemon=True)
    watcher.start()
    answer = None
    while answer is None:
        sock.sendto(req, a.server)
        deadline = time.monotonic() + 0.002
        while time.monotonic() < deadline:
            try:
                r = parse(sock.recv(2048))
            except socket.timeout:
                break
            if r and r["result"] == 0:
                answer = r
                break
        if time.monotonic() - t0 > 120:
            sys.exit("no answer from the backup within 120 s")
    answered = time.monotonic() - t0
    watcher.join(timeout=10)
    status = get_json(a.admin, "/status")
    ha = get_json(a.admin, "/ha")
    print(json.dumps({
        "answer_ms": round(answered * 1000, 1),
        "role_active_ms": round(active_at.get("t", float("nan")) * 1000, 1),
        "external_port": answer["external_port"],
        "echoed": answer["echoed"],
        "mappings": status["mappings"],
        "checkpointed": status["checkpointed"],
        "adopted": ha["adopted"],
        "term": ha["term"],
    }))


if __name__ == "__main__":
    main()
