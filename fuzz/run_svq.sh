#!/usr/bin/env bash
# Build the SVQ ring fuzzer (fuzz/svq_fuzz.c + vduproxy/svq_core.c) with libFuzzer, ASan and UBSan and run it.
# Usage: fuzz/run_svq.sh [seconds] [extra libFuzzer flags...]   (default 30 s; e.g. `fuzz/run_svq.sh 600 -runs=2000000`)
# Starts from the committed corpus (fuzz/corpus/svq, never written) plus a scratch corpus that grows across runs.
# Exit status is non-zero on any crash, sanitizer report, contract violation, leak or timeout; the input that
# caused it is saved under $FUZZ_OUT/artifacts/. Needs clang and libclang-rt-14-dev (libFuzzer runtime).
# Environment: FUZZ_OUT (default build/fuzz), CC (default clang), FUZZ_REBUILD=1 forces a rebuild.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
seconds="${1:-30}"
shift || true
out="${FUZZ_OUT:-$root/build/fuzz}"
bin="$out/svq_fuzz"
mkdir -p "$out/svq-corpus" "$out/artifacts"
CC="${CC:-clang}"
sources=("$here/svq_fuzz.c" "$root/vduproxy/svq_core.c" "$root/vduproxy/svq_core.h")
stale=0
for src in "${sources[@]}"; do
  [[ "$src" -nt "$bin" ]] && stale=1
done
if [[ ! -x "$bin" || "$stale" == 1 || "${FUZZ_REBUILD:-0}" == 1 ]]; then
  "$CC" -std=c11 -O1 -g -Wall -Wextra -Werror -pthread \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
    -I"$root/vduproxy" "$root/vduproxy/svq_core.c" "$here/svq_fuzz.c" -o "$bin"
fi
export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:abort_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# -timeout: one input running this long is a hang; -rss_limit_mb: a leak or runaway allocation is a failure.
exec "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 \
  -artifact_prefix="$out/artifacts/" "$@" "$out/svq-corpus" "$here/corpus/svq"
