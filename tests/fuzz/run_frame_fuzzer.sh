#!/usr/bin/env bash
# Runs the frame fuzzer on the saved corpus. New inputs go to a scratch directory (the saved
# corpus is only read); crashes land in the scratch directory too, and the exit status is
# non-zero. Usage:
#   tests/fuzz/run_frame_fuzzer.sh [FUZZER_BINARY] [libFuzzer flags...]
#   e.g. tests/fuzz/run_frame_fuzzer.sh build/fuzz/frame_fuzzer -max_total_time=600
# With no binary (or a missing one) it builds it first; exits 77 (skip) without clang/libFuzzer.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
fuzzer="${1:-}"
[[ -n "$fuzzer" && -x "$fuzzer" ]] && fuzzer="$(cd "$(dirname "$fuzzer")" && pwd)/$(basename "$fuzzer")"
[[ $# -gt 0 ]] && shift
if [[ -z "$fuzzer" || ! -x "$fuzzer" ]]; then
  fuzzer="$("$root/tests/fuzz/build_frame_fuzzer.sh" "$root/build/fuzz" | tail -1)" || exit $?
fi
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch/new"' EXIT
mkdir -p "$scratch/new"
cd "$scratch"
args=("$@")
[[ ${#args[@]} -eq 0 ]] && args=(-max_total_time=60)
exec "$fuzzer" -rss_limit_mb=2048 -timeout=10 -artifact_prefix="$scratch/" "${args[@]}" \
  "$scratch/new" "$root/tests/fuzz/corpus/frame"
