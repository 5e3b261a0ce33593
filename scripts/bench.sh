#!/usr/bin/env bash
# Runs every sealpost-bench scenario with the settings behind docs/BENCHMARKS.md.
# The server is pinned to CPU 0 and the load generator to CPU 1; everything stays on
# loopback. Results: target/bench-results/*.json and docs/latency-under-load.svg.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p sealpost-server -p sealpost-bench
bench=(taskset -c 1 target/release/sealpost-bench --server-cpus 0)

"${bench[@]}" relay --pairs 10,100,1000 --messages 200000
"${bench[@]}" latency --pairs 100 --messages 100000 --repeat 3 --plot docs/latency-under-load.svg
# Ten pairs too (the setting closest to the p99 target, docs/BENCHMARKS.md); its own
# directory, so that it does not replace the 100-pair latency.json. Paced runs measure
# latency after their first 3 s (`--measure-after-ms`, the default), the steady state.
"${bench[@]}" --out target/bench-results/pairs-10 latency --pairs 10 --messages 100000 --repeat 3
"${bench[@]}" idle --steps 1000,10000,19000
"${bench[@]}" drain --messages 10000 --runs 5
"${bench[@]}" fanout --members 10,100,1000 --rounds 20
