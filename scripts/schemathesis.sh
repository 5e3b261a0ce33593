#!/usr/bin/env bash
# Fuzzes the HTTP API against its own OpenAPI document with schemathesis.
#   scripts/schemathesis.sh [MAX_SECONDS]     (default 120: the main run's time budget)
#
# Builds the debug server and the `api_token` example, starts the server on a free
# loopback port with a temporary data directory and rate limits raised (so the fuzzer is
# not throttled), registers two accounts to get real bearer tokens, then runs schemathesis
# on GET /v1/openapi.json for MAX_SECONDS: positive and negative cases for every
# operation, failing on any 5xx, any status, content type, header or body that the
# document does not describe, and on the other checks in CHECKS below.
# DELETE /v1/accounts/me runs afterwards, on its own account, so that it does not log the
# main run out. Exits non-zero on any failure, or if the server panicked or died.
#
# Python: a venv under $CARGO_TARGET_DIR (default target/) with a pinned schemathesis,
# created on first use (needs PyPI once) with $SEALPOST_PYTHON, else the first of
# python3.13, python3.12, python3 that runs and is at least 3.11.8 (3.11.7 and older hit a
# CPython bug, "AST constructor recursion depth mismatch", inside hypothesis).
# SEALPOST_SCHEMATHESIS_SEED fixes the seed; SEALPOST_SCHEMATHESIS_EXAMPLES the cases per
# operation (default 60). Settings of the checks are in scripts/schemathesis.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
max_seconds="${1:-120}"
examples="${SEALPOST_SCHEMATHESIS_EXAMPLES:-60}"
seed="${SEALPOST_SCHEMATHESIS_SEED:-$RANDOM$RANDOM}"
target_dir="${CARGO_TARGET_DIR:-target}"
target_dir="$(mkdir -p "$target_dir" && cd "$target_dir" && pwd)"
venv="$target_dir/schemathesis-venv"
# Every check but positive_data_acceptance: most valid requests cannot be described by a
# schema (signatures, certificates, MLS messages, epoch ranges), so schema-valid data is
# often rightly refused. The others include not_a_server_error (any 5xx),
# status_code_conformance, content_type_conformance, response_headers_conformance,
# response_schema_conformance, negative_data_rejection, unsupported_method and ignored_auth.
CHECKS="${SEALPOST_SCHEMATHESIS_CHECKS:-all}"
EXCLUDE_CHECKS="${SEALPOST_SCHEMATHESIS_EXCLUDE_CHECKS:-positive_data_acceptance}"

echo "== build"
# With the test build's features (`--tests`), so that after `cargo test --workspace` (as in
# CI) nothing is compiled again; a plain `cargo build -p sealpost-server` resolves other
# features for a dozen dependencies and rebuilds most of the tree (5 minutes on 2 cores).
# The server binary then contains the `adversarial` hooks, inert unless a test sets them.
cargo build --quiet --workspace --tests --bins --examples
server_bin="$target_dir/debug/sealpost-server"
token_bin="$target_dir/debug/examples/api_token"

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "version $SCHEMATHESIS_VERSION\$"; then
  python=""
  for candidate in ${SEALPOST_PYTHON:-} python3.13 python3.12 python3; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11, 8))' 2>/dev/null; then
      python="$candidate"
      break
    fi
  done
  if [ -z "$python" ]; then
    echo "no Python >= 3.11.8 found; set SEALPOST_PYTHON" >&2
    exit 1
  fi
  echo "== installing schemathesis $SCHEMATHESIS_VERSION in $venv ($python)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== starting the server"
# Port 0: the kernel picks a free port; the server logs the address it got.
SEALPOST_LOG=info "$server_bin" \
  --listen 127.0.0.1:0 --data-dir "$work/data" --kt-interval-ms 100 \
  --ip-rate 100000 --ip-burst 100000 --account-rate 100000 --account-burst 100000 \
  --claims-per-minute 100000 --claims-burst 100000 \
  2>"$work/server.log" &
server_pid=$!
addr=""
for _ in $(seq 1 300); do
  addr="$(sed -n 's/.*listening.*addr=\([0-9.:]*\).*/\1/p' "$work/server.log" | head -n 1)"
  [ -n "$addr" ] && break
  if ! kill -0 "$server_pid" 2>/dev/null; then
    cat "$work/server.log" >&2
    echo "the server exited at startup" >&2
    exit 1
  fi
  sleep 0.1
done
case "$addr" in
  127.0.0.1:*) ;;
  *) cat "$work/server.log" >&2; echo "the server did not report a loopback address" >&2; exit 1 ;;
esac
url="http://$addr"
echo "server at $url"

echo "== registering test accounts"
token="$("$token_bin" "$url" "$work/fuzzer" fuzzer)"
delete_token="$("$token_bin" "$url" "$work/deleted" deleted_account)"
device_id="$(SEALPOST_TOKEN="$token" "$venv/bin/python" - "$url" <<'PY'
import json, os, sys, urllib.request
request = urllib.request.Request(
    sys.argv[1] + "/v1/me", headers={"Authorization": "Bearer " + os.environ["SEALPOST_TOKEN"]}
)
print(json.load(urllib.request.urlopen(request, timeout=10))["device_id"])
PY
)"

# The checked-in settings, plus the test account's identifiers: half of the generated
# usernames and device ids are real ones, so that cases also reach existing resources
# (a user's devices, a device's KeyPackages, renaming, self-revocation).
config="$work/schemathesis.toml"
cat scripts/schemathesis.toml - >"$config" <<EOF

[dictionaries.usernames]
values = ["fuzzer"]

[dictionaries.devices]
values = ["$device_id"]

[parameters]
"path.username" = { dictionary = "usernames", probability = 0.5 }
"path.device_id" = { dictionary = "devices", probability = 0.5 }
"body.device_id" = { dictionary = "devices", probability = 0.5 }
EOF

# schemathesis keeps a cache of crashes in its working directory: keep it under target/.
run_dir="$target_dir/schemathesis-run"
mkdir -p "$run_dir"
run() {
  (cd "$run_dir" && "$venv/bin/schemathesis" --config-file "$config" \
    run "$url/v1/openapi.json" \
    --checks "$CHECKS" \
    --exclude-checks "$EXCLUDE_CHECKS" \
    --mode all \
    --max-examples "$examples" \
    --seed "$seed" \
    --generation-database none \
    --request-timeout 30 \
    --workers 2 \
    --no-color \
    "$@")
}

echo "== schemathesis (seed $seed, at most $examples cases per operation, ${max_seconds}s)"
status=0
run --max-time "$max_seconds" -H "Authorization: Bearer $token" \
  --exclude-operation-id delete_account || status=$?
echo "== schemathesis: DELETE /v1/accounts/me"
run -H "Authorization: Bearer $delete_token" \
  --include-operation-id delete_account || status=$?

if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "the server died during the run" >&2
  status=1
fi
if grep -q 'panicked' "$work/server.log"; then
  grep -B2 -A10 'panicked' "$work/server.log" >&2
  echo "the server panicked" >&2
  status=1
fi
if [ "$status" -ne 0 ]; then
  echo "schemathesis found failures (seed $seed); server log:" >&2
  tail -n 50 "$work/server.log" >&2
fi
exit "$status"
