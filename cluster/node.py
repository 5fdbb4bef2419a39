"""One Ray worker node on 127.0.0.1, joined to a head: `python cluster/node.py --address H:P ...`
(cluster/local.py starts these; run by path, so the repo never lands on the node's sys.path).

Why not `ray start --address=127.0.0.1:P --node-ip-address=127.0.0.1`: on Linux `ray start`
rewrites both loopback addresses to the machine's outward IP (`resolve_ip_for_localhost`), and
with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which keeps it on loopback) it refuses to join a
worker at all. This process does what `ray start --block` does for a worker node, with Ray's own
`Node` class (the machinery of `ray.cluster_utils.Cluster.add_node`), and keeps every address at
127.0.0.1. It blocks until SIGTERM, then stops the node's processes (Ray's shutdown hook).
"""
from __future__ import annotations

import argparse
import json
import os
import time

LOOPBACK = "127.0.0.1"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", required=True, help="head GCS address, 127.0.0.1:PORT")
    p.add_argument("--num-cpus", type=float, required=True)
    p.add_argument("--num-gpus", type=int, default=0)
    p.add_argument("--resources", default="{}", help='custom resources as JSON, e.g. {"worker": 1}')
    p.add_argument("--object-store-mb", type=int, default=200)
    p.add_argument("--temp-dir", required=True, help="this node's own Ray temp dir (as on another machine)")
    p.add_argument("--agent-port", type=int, required=True, help="dashboard agent HTTP port")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    host = args.address.rsplit(":", 1)[0]
    if host != LOOPBACK:
        raise SystemExit(f"--address {args.address}: this launcher only joins a head on {LOOPBACK}")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # any address Ray derives stays loopback
    import ray._private.node
    import ray._private.parameter
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled

    params = ray._private.parameter.RayParams(
        gcs_address=args.address, node_ip_address=LOOPBACK, num_cpus=args.num_cpus,
        num_gpus=args.num_gpus, resources=json.loads(args.resources),
        object_store_memory=args.object_store_mb * 2**20, temp_dir=args.temp_dir,
        node_manager_port=0, min_worker_port=0, max_worker_port=0,
        dashboard_agent_listen_port=args.agent_port, include_log_monitor=True)
    ensure_token_if_auth_enabled(None, create_token_if_missing=False)  # the head's token, or fail
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"worker node {node.node_id} up on {LOOPBACK} (raylet port {node.node_manager_port})", flush=True)
    while True:  # SIGTERM -> Ray's handler drains the node, stops its processes and exits
        time.sleep(1)
        dead = [name for name, proc in node.dead_processes()]
        if dead:
            print(f"node processes exited: {dead}; stopping the node", flush=True)
            node.kill_all_processes(check_alive=False, allow_graceful=False)
            os._exit(1)


if __name__ == "__main__":
    main()
