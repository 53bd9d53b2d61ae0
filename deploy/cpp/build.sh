#!/usr/bin/env bash
# Build the C++ demo, then run it when arguments are given:
#   deploy/cpp/build.sh                                  # build only
#   deploy/cpp/build.sh EXPORT_DIR --prompt "Hello"      # build (if needed), then run infer_demo
# PYTHON: the interpreter whose torch wheel provides libtorch (default: python3).
# BUILD_DIR: where to build (default: deploy/cpp/build). Build output goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
build="${BUILD_DIR:-$here/build}"
prefix="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
cmake -S "$here" -B "$build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >&2
cmake --build "$build" -j "$(nproc)" >&2
if [ "$#" -gt 0 ]; then
  exec "$build/infer_demo" "$@"
fi
