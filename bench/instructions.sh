#!/bin/sh
# Instructions the dataplane executes for a fixed workload, counted by
# valgrind (cachegrind's "I refs"): deterministic within about 1%, unlike CPU
# time on a shared machine, so two builds can be compared by a few runs.
#
#   bench/instructions.sh BIN_DIR WORKLOAD
#
# BIN_DIR holds relay-control, relay-dataplane, relayctl and relay-bench.
# WORKLOAD: idle (start, one connection, stop), conns (idle + $CONNS
# connections, each a handshake, a tunnel and one echo, one after another) or
# echo (idle + one connection echoing 4 x $COUNT datagrams of 1200 bytes).
# One worker on epoll (valgrind does not run io_uring); control runs natively.
# Prints "WORKLOAD INSTRUCTIONS". Needs valgrind.
set -eu
BIN=$1; WORK=$2; CONNS=${CONNS:-100}; COUNT=${COUNT:-5000}
D=$(mktemp -d); PORT=$((20000 + $$ % 20000))
cat > $D/relay.toml <<CFG
[relay]
state_dir = "$D/state"
[listen]
quic = "127.0.0.1:$PORT"
metrics = ""
tcp = ""
[dataplane]
workers = 1
io = "epoll"
[auth]
tokens = ["bench-token"]
[targets]
allow = ["127.0.0.0/8"]
CFG
RUST_LOG=warn $BIN/relay-control --config $D/relay.toml >/dev/null 2>$D/control.log & C=$!
while [ ! -S $D/state/channel.sock ]; do sleep 0.05; done
RUST_LOG=warn valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=$D/cg.out \
  $BIN/relay-dataplane --control-socket $D/state/channel.sock >/dev/null 2>$D/dataplane.log & P=$!
CLIENT="--relay 127.0.0.1:$PORT --ca $D/state/cert.pem --token bench-token"
until $BIN/relay-bench tunnel-echo $CLIENT --flows 1 --count 1 --size 100 >/dev/null 2>&1; do sleep 0.5; done
case $WORK in
  conns) i=0; while [ $i -lt $CONNS ]; do $BIN/relay-bench tunnel-echo $CLIENT --flows 1 --count 1 --size 100 >/dev/null; i=$((i+1)); done ;;
  echo) $BIN/relay-bench tunnel-echo $CLIENT --flows 4 --count $COUNT --size 1200 --window 8 >/dev/null ;;
  idle) ;;
  *) echo "unknown workload $WORK" >&2; exit 2 ;;
esac
sleep 1
# SIGINT stops the dataplane at once; cachegrind writes its counts on exit.
kill -INT $P
wait $P || true
kill $C; wait $C 2>/dev/null || true
echo "$WORK $(awk '/^summary:/ {print $2}' $D/cg.out)"
rm -rf $D
