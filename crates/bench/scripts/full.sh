#!/bin/bash
# The full benchmark set (BENCHMARKS.md), standalone then the local cluster
# on MariaDB (database stacker_bench, dropped and made anew) and Redis.
# usage: B=stacker-bench S=stacker full.sh OUTDIR [standalone|cluster|all]
set -u
B=${B:?set B to the stacker-bench binary} S=${S:?set S to the stacker binary} OUT=$1 WHAT=${2:-all}
mkdir -p $OUT
run() { local name=$1; shift; echo "== $(date +%T) $name: $*"; timeout 900 $B "$@" --json $OUT/$name.json > $OUT/$name.txt 2>&1; echo "rc=$?"; grep -E "verified|FAIL|error" $OUT/$name.txt | head -3; }
median() { python3 -c "import json,statistics,sys;print(int(statistics.median(json.load(open(f))['runs'][0]['results']['stored_per_s'] for f in sys.argv[1:])))" "$@"; }
if [ $WHAT != cluster ]; then
for i in 1 2 3; do run sa-flat-$i direct --spawn $S --pairs 200 --duration 10 --window 16; done
MAX=$(median $OUT/sa-flat-{1,2,3}.json); HALF=$((MAX/2000*1000)); echo "standalone max $MAX half $HALF"
for i in 1 2 3; do run sa-half-$i direct --spawn $S --pairs 200 --duration 15 --rate $HALF; done
for i in 1 2 3; do run sa-10k-$i direct --spawn $S --pairs 200 --duration 15 --rate 10000; done
for i in 1 2; do run sa-20k-$i direct --spawn $S --pairs 200 --duration 15 --rate 20000; done
run sa-light direct --spawn $S --pairs 5 --duration 10 --rate 100
run sa-baseline direct --spawn $S --pairs 200 --duration 10 --window 16 --vs-baseline
run sa-group group --spawn $S --rooms 1 --members 500 --senders 4 --duration 10 --window 16 --vs-baseline
run sa-idle idle --spawn $S --connections 19000 --users 100 --hold 35
run sa-reconnect reconnect --spawn $S --users 1000 --devices 10 --room-size 100 --missed 100
run sa-history-1m history --spawn $S --messages 1000000 --readers 1 --reads 3000
fi
if [ $WHAT != standalone ]; then
mysql -h127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS stacker_bench; CREATE DATABASE stacker_bench"
STACKER_DATABASE__URL=mysql://root@127.0.0.1:3306/stacker_bench \
STACKER_CLUSTER__REDIS_URL=redis://127.0.0.1:6379 STACKER_LOG__LEVEL=warn \
STACKER_AUTH__MAX_REGISTRATIONS_PER_ADDRESS_PER_MINUTE=0 \
  $S cluster --base-port 9080 > $OUT/cluster.log 2>&1 &
CL=$!
for i in $(seq 60); do curl -sf http://127.0.0.1:9083/healthz >/dev/null && curl -sf http://127.0.0.1:9084/healthz >/dev/null && curl -sf http://127.0.0.1:9094/healthz >/dev/null && break; sleep 1; done
sleep 3
PIDS=$(pgrep -f "$(basename $S) (registry|meta|send|gateway|flusher)" | sed 's/^/--server-pid /' | tr '\n' ' ')
echo "cluster pids: $PIDS"
DIST="--url http://127.0.0.1:9082 --registry-url http://127.0.0.1:9083 --send-url http://127.0.0.1:9081 $PIDS"
for i in 1 2 3; do run d-flat-$i direct $DIST --pairs 200 --duration 10 --window 16; done
DMAX=$(median $OUT/d-flat-{1,2,3}.json); DHALF=$((DMAX/2000*1000)); echo "cluster max $DMAX half $DHALF"
for i in 1 2; do run d-half-$i direct $DIST --pairs 200 --duration 15 --rate $DHALF; done
for i in 1 2; do run d-7k-$i direct $DIST --pairs 200 --duration 15 --rate 7000; done
run d-group group $DIST --rooms 1 --members 500 --senders 4 --duration 10 --window 16
run d-idle idle $DIST --connections 5000 --users 100 --hold 10
run d-reconnect reconnect $DIST --users 200 --devices 10 --room-size 100 --missed 100
run d-history history $DIST --messages 20000 --readers 1 --reads 1000
kill -TERM $CL; wait $CL
fi
python3 "$(dirname "$0")/summary.py" $OUT > $OUT/summary.txt
echo "== $(date +%T) done"
