#!/usr/bin/env bash
# The main job on one machine. Installs and builds what is missing, then runs Ferry's attention
# path end to end: a ragged batch whose KV is split over simulated attention workers, each
# worker's partial states merged with the partial-state algebra and checked against a float64
# reference, with timings. (Once the daemons land this starts a real local cluster.)
#
#   ./deploy/local/demo.sh [extra flags for `ferry demo attention`, e.g. --workers=4]
set -euo pipefail
cd "$(dirname "$0")/../.."

build_dir=${FERRY_BUILD_DIR:-build}
if [ ! -x "$build_dir/bin/ferry" ]; then
  ./deploy/install-deps.sh
  cmake -S . -B "$build_dir" -G Ninja ${FERRY_CMAKE_ARGS:-}
fi
cmake --build "$build_dir" --target ferry
exec "$build_dir/bin/ferry" demo attention "$@"
