#!/usr/bin/env bash
# The test command: installs dependencies, configures, builds and runs the whole suite through
# ctest. Exits non-zero on any failure. GPU tests skip cleanly where no CUDA device is present.
#
#   ./tests/run.sh                      # everything
#   FERRY_BUILD_DIR=build-ci ./tests/run.sh
#   FERRY_CMAKE_ARGS="-DFERRY_CUDA_ARCHS=90a -DFERRY_HEAD_DIMS=128" ./tests/run.sh
#   FERRY_CTEST_ARGS="-L unit" ./tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

./deploy/install-deps.sh

build_dir=${FERRY_BUILD_DIR:-build}
# shellcheck disable=SC2086  # FERRY_CMAKE_ARGS is a list of arguments
cmake -S . -B "$build_dir" -G Ninja ${FERRY_CMAKE_ARGS:-}
cmake --build "$build_dir"
# shellcheck disable=SC2086
ctest --test-dir "$build_dir" --output-on-failure --timeout 300 -j "$(nproc)" ${FERRY_CTEST_ARGS:-}
