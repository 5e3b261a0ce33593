#!/usr/bin/env bash
# Counts the server's user-space instructions per relayed message under callgrind, a
# figure that does not depend on how busy or how fast the machine is (docs/BENCHMARKS-LOG.md,
# section 1, "Instructions per message").
#
#   scripts/callgrind-relay.sh [SERVER_BINARY] [SECONDS]
#
# Runs `sealpost-bench relay --pairs 100` against the server under valgrind; when the
# timed part starts it zeroes callgrind's counters, waits SECONDS (default 25), dumps them,
# and divides by the application messages the server accepted in between (its /metrics).
# SHA-256 is reported apart: valgrind does not offer the SHA extensions, so the hash runs
# in software here and on the SHA-NI instructions outside it.
# Needs valgrind (callgrind_control, callgrind_annotate), curl and ss. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

server=$(realpath "${1:-target/release/sealpost-server}")
seconds=${2:-25}
work=$(mktemp -d)
trap 'pkill -f "sealpost-bench.*$work" 2>/dev/null || true; pkill -f "valgrind.*$work" 2>/dev/null || true' EXIT

cat >"$work/server.sh" <<EOF
#!/usr/bin/env bash
exec valgrind --tool=callgrind --callgrind-out-file=$work/callgrind.%p.out "$server" "\$@"
EOF
chmod +x "$work/server.sh"

cargo build --release -p sealpost-bench
taskset -c 1 target/release/sealpost-bench --server-cpus 0 --server-binary "$work/server.sh" \
    --out "$work/results" relay --pairs 100 --messages 60000 >"$work/bench.log" 2>&1 &

for _ in $(seq 1 300); do
    grep -q 'timed part' "$work/bench.log" && break
    sleep 1
done
grep -q 'timed part' "$work/bench.log" || { cat "$work/bench.log"; exit 1; }
sleep 4
pid=$(pgrep -f "valgrind.*$work" | head -1)
address=$(ss -ltnp | grep "pid=$pid," | grep -o '127.0.0.1:[0-9]*' | head -1)
accepted() {
    curl -s "$address/metrics" |
        awk '/^sealpost_messages_in_total\{kind="application"\} /{print $2}'
}

callgrind_control -z "$pid" >/dev/null
before=$(accepted)
sleep "$seconds"
callgrind_control -d "$pid" >/dev/null
after=$(accepted)

profile=$(ls "$work"/callgrind.*.out.1)
total=$(callgrind_annotate "$profile" | awk '/PROGRAM TOTALS/{gsub(",", "", $1); print $1}')
sha=$(callgrind_annotate --inclusive=yes "$profile" |
    awk '!found && /sha2::sha256::compress256/{gsub(",", "", $1); print $1; found = 1}')
python3 - "$before" "$after" "$total" "${sha:-0}" <<'EOF'
import sys
before, after, total, sha = (float(x) for x in sys.argv[1:])
messages = after - before
print(f"messages {messages:.0f}, user-space instructions per message {total / messages:,.0f}, "
      f"without SHA-256 {(total - sha) / messages:,.0f}")
EOF
cp "$profile" target/callgrind-relay.out
echo "profile: target/callgrind-relay.out (callgrind_annotate --inclusive=yes)"
