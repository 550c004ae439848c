#!/usr/bin/env bash
# Builds the frame fuzzer with clang (libFuzzer + AddressSanitizer): the frame decoder, the worker
# service, the KV and state caches and the CPU kernels, compiled from source. Usage:
#   tests/fuzz/build_frame_fuzzer.sh [OUT_DIR]        (default build/fuzz)
# Without clang++ or libFuzzer it writes OUT_DIR/frame_fuzzer as a stub that exits 77, which
# ctest reads as "skipped".
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$root/build/fuzz}"
cxx="${CLANGXX:-clang++}"
mkdir -p "$out/obj"
stub() {
  printf '#!/bin/sh\necho "frame fuzzer not built: %s" >&2\nexit 77\n' "$1" > "$out/frame_fuzzer"
  chmod +x "$out/frame_fuzzer"
  echo "$1: the fuzzer is a stub that skips" >&2
  echo "$out/frame_fuzzer"
  exit 0
}
command -v "$cxx" >/dev/null || stub "no $cxx"
if ! echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' |
    "$cxx" -x c++ -fsanitize=fuzzer -o "$out/obj/probe" - 2>/dev/null; then
  stub "$cxx has no libFuzzer"
fi
# A changed header rebuilds everything (the script tracks no per-file includes).
if [[ -n "$(find "$root/runtime" "$root/kernels/include" -name '*.h' -newer "$out/obj/probe.stamp" \
      2>/dev/null | head -1)" || ! -f "$out/obj/probe.stamp" ]]; then
  rm -f "$out"/obj/*.o
fi
flags=(-std=c++20 -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address
       -I"$root" -I"$root/kernels/include" $(pkg-config --cflags absl_status absl_strings))
# The CPU kernels are not what is fuzzed and clang 14 rejects their f16c dispatch check: they are
# compiled with the project's compiler, without instrumentation.
plain="${PLAINCXX:-g++}"
plain_flags=(-std=c++20 -g -O2 -I"$root/kernels/include" $(pkg-config --cflags absl_status absl_strings))
sources=(tests/fuzz/frame_fuzzer.cc runtime/offload/frame.cc runtime/offload/worker_service.cc
         runtime/offload/cpu_attention_backend.cc runtime/kv/kv_cache.cc runtime/kv/state_cache.cc
         kernels/cpu/decode_attention_cpu.cc kernels/cpu/linear_attention_cpu.cc
         kernels/cpu/decode_attention_span_avx512.cc kernels/cpu/decode_attention_span_avx2.cc
         kernels/cpu/decode_attention_span_baseline.cc kernels/cpu/dtype.cc kernels/cpu/thread_pool.cc)
objects=()
pids=()
for source in "${sources[@]}"; do
  object="$out/obj/$(basename "${source%.cc}").o"
  extra=()
  case "$source" in
    *avx512*) extra=(-mavx512f -mavx512bw -mavx512vl -mavx2 -mfma -mf16c) ;;
    *avx2*) extra=(-mavx2 -mfma -mf16c) ;;
  esac
  objects+=("$object")
  if [[ ! -f "$object" || "$root/$source" -nt "$object" || "$0" -nt "$object" ]]; then
    if [[ "$source" == kernels/* ]]; then
      "$plain" "${plain_flags[@]}" "${extra[@]}" -c "$root/$source" -o "$object" &
    else
      "$cxx" "${flags[@]}" "${extra[@]}" -c "$root/$source" -o "$object" &
    fi
    pids+=($!)
  fi
done
for pid in "${pids[@]}"; do wait "$pid"; done
touch "$out/obj/probe.stamp"
"$cxx" -fsanitize=fuzzer,address "${objects[@]}" -o "$out/frame_fuzzer" \
  $(pkg-config --libs absl_status absl_statusor absl_strings) -lpthread
echo "$out/frame_fuzzer"
