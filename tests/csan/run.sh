#!/usr/bin/env bash
# Build the SVQ core and its C test driver with AddressSanitizer + UndefinedBehaviorSanitizer and run it, then
# with ThreadSanitizer (the core's thread: start, park, stop, configuration while running).
# Exit status is non-zero on any failed check or any sanitizer report (every sanitizer halts on first error).
# Usage: tests/csan/run.sh [build-dir]   (default: build/csan)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/build/csan}"
mkdir -p "$out"
CC="${CC:-gcc}"
"$CC" -std=c11 -O1 -g -Wall -Wextra -Werror -pthread \
  -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
  -I"$root/vduproxy" "$root/vduproxy/svq_core.c" "$here/svq_test.c" -o "$out/svq_test"
# -Wno-error: GCC 12 warns that TSan does not instrument atomic_thread_fence (the core's fences are belt and braces
# next to its acquire/release accesses, which TSan does see).
"$CC" -std=c11 -O1 -g -Wall -Wextra -pthread -Wno-tsan -fsanitize=thread -fno-omit-frame-pointer \
  -I"$root/vduproxy" "$root/vduproxy/svq_core.c" "$here/svq_test.c" -o "$out/svq_test_tsan"
export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:abort_on_error=0:exitcode=99"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
"$out/svq_test"
TSAN_OPTIONS="halt_on_error=1:exitcode=98:suppressions=$here/tsan.supp" "$out/svq_test_tsan"
