#!/usr/bin/env bash
# Local multi-node Ray cluster on 127.0.0.1 with token auth (see cluster/README.md).
#   cluster/local.sh start [--workers 2] [--worker-cpus 1] [--name dev]
#   cluster/local.sh stop  [--name dev]        cluster/local.sh status [--name dev]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
cd "$repo"
exec "$py" -m cluster.local "$@"
