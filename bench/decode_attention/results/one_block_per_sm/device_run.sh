#!/bin/bash
# One block per SM with a deep ring (as SDPA cuDNN's persistent kernel): cp.async (cpr1) and
# copy engine (tmar1) against main.
set -u
B=.gpu-lean6
source $B/env.sh
TEST=tmar1 SANITIZE=0 bash bench/decode_attention/compare_builds.sh $B main cpr1 tmar1 2>&1 | tail -22
