#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ for a while each.
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
# Needs cargo-fuzz (`cargo install cargo-fuzz`); on a stable toolchain it runs with
# RUSTC_BOOTSTRAP=1 and no sanitizer (the code is `unsafe`-free; libFuzzer still finds
# panics, which is what these targets look for). Crashes are saved under fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
export RUSTC_BOOTSTRAP=1
# SEALPOST_FUZZ_BUILD=dev builds the cheap dev profile of fuzz/Cargo.toml (CI); the default
# is cargo-fuzz's optimised release build.
build=()
if [ "${SEALPOST_FUZZ_BUILD:-release}" = dev ]; then
  build=(--dev)
fi
for target in "${targets[@]}"; do
  echo "== fuzz $target for ${seconds}s"
  cargo fuzz run "${build[@]}" --sanitizer none "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048
done
