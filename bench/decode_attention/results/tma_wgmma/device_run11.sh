source .gpu-wg/env.sh
for row in "b64 hq32 hkv8 L4096 d64" "b8 hq32 hkv8 L32768 d128" "b256 hq32 hkv8 L1024 d128"; do
  echo "== $row"
  timeout 60 .gpu-wg/bin/lean_decode_bench_tl --only "$row" --iters 30 2>&1 | grep -E "timeline|$row" | sort -k3 -n | head -16
done
