#!/usr/bin/env python3
"""One line per run of a results folder: file, scenario, key numbers, server CPU, verified."""
import json, sys, os, glob
d = sys.argv[1]
print("# one line per run: file, scenario, rate (0 = flat out), stored+acked/s or deliveries/s, p50/p99 ms, server CPU % of one core, generator CPU %, verified, extra")
for f in sorted(glob.glob(os.path.join(d, "*.json"))):
    j = json.load(open(f))
    for r in j["runs"]:
        res, p, pr = r["results"], r["params"], r["processes"]
        sc, tgt = r["scenario"], r.get("target", "")
        srv = pr.get("server", {}).get("cpu_pct_of_one_core")
        gen = pr.get("generator", {}).get("cpu_pct_of_one_core")
        lat = res.get("latency") or res.get("caught_up") or {}
        rate = p.get("rate", "-")
        thr = res.get("stored_per_s") or res.get("deliveries_per_s") or res.get("reads_per_s") or res.get("held") or 0
        extra = ""
        if sc == "reconnect":
            extra = f"all_caught_up_s={res.get('all_caught_up_s')} retries={res.get('retries')}"
        if sc == "idle":
            extra = f"held={res.get('held')} rss_per_conn_kib={res.get('server_rss_per_conn_kib')} idle_cpu={res.get('server_idle_cpu_pct')}"
        if sc == "group":
            extra = f"deliveries_per_s={res.get('deliveries_per_s')}"
        if sc == "history":
            extra = f"messages={p.get('messages')}"
        print(os.path.basename(f), sc, tgt, rate, round(thr) if isinstance(thr, (int, float)) else thr,
              lat.get("p50_ms"), lat.get("p99_ms"), srv, gen, r["verified"], extra)
    if j.get("comparison"):
        print("   comparison:", json.dumps(j["comparison"])[:300])
