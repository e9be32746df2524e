#!/bin/bash
# own.sh NAME SERVER BENCH RATE [KEY=VALUE...]: a standalone server started
# here (127.0.0.1:18080, fresh data dir) under `direct` at RATE msg/s; its
# /metrics and per-thread CPU read over 4 s from MIDWAIT s (default 8; the
# 400 users' setup must be over by then) and printed as rates.
N=$1 S=$2 B=$3 R=$4; shift 4   # results in /tmp/own-NAME.*
D=$(mktemp -d)
env STACKER_DATA_DIR=$D STACKER_SERVER__LISTEN=127.0.0.1:18080 STACKER_LOG__LEVEL=warn STACKER_AUTH__MAX_REGISTRATIONS_PER_ADDRESS_PER_MINUTE=0 STACKER_WS__MAX_CONNECTIONS=1000000 "$@" $S standalone > /tmp/own-$N.log 2>&1 &
P=$!
for i in $(seq 50); do curl -sf http://127.0.0.1:18080/healthz >/dev/null && break; sleep 0.2; done
$B direct --url http://127.0.0.1:18080 --server-pid $P --pairs 200 --duration 15 --rate $R --json /tmp/own-$N.json > /tmp/own-$N.txt 2>&1 &
BP=$!
sleep ${MIDWAIT:-8}
snap() { for t in /proc/$P/task/*; do echo "$(basename $t) $(cat $t/comm | tr ' ' _) $(awk '{print $14+$15}' $t/stat)"; done; curl -s http://127.0.0.1:18080/metrics | grep -v "^#" | grep -E "(_sum|_count) "; }
snap > /tmp/own-$N.1; sleep 4; snap > /tmp/own-$N.2
wait $BP
kill -TERM $P; wait $P
rm -rf $D
python3 - /tmp/own-$N <<'PY'
import sys,collections
b=sys.argv[1]
def rd(f):
    th=collections.Counter(); m={}
    for l in open(f):
        p=l.split()
        if len(p)==3 and p[0].isdigit(): th[p[1]]+=int(p[2])
        elif len(p)==2: m[p[0]]=float(p[1])
    return th,m
(t1,m1),(t2,m2)=rd(b+'.1'),rd(b+'.2')
print("threads % of a core:", {k:round((t2[k]-t1[k])/4,1) for k in t2 if t2[k]-t1[k]>0})
d={k:m2[k]-m1.get(k,0) for k in m2}
for n in ["stacker_commit_seconds","stacker_commit_batch_size","stacker_sqlite_writer_checkpoint_seconds","stacker_sqlite_checkpoint_sync_seconds","stacker_enqueue_seconds","stacker_dispatch_queue_seconds"]:
    c=d.get(n+"_count",0); s=d.get(n+"_sum",0)
    if c: print(f"{n}: {c/4:.0f}/s, mean {s/c*1000 if 'seconds' in n else s/c:.3f}{' ms' if 'seconds' in n else ''}")
PY
grep -E "send -> deliver|stored \+ acked / s|server  " /tmp/own-$N.txt | head -4
