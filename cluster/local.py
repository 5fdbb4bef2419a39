"""A multi-node Ray cluster on 127.0.0.1 for development, tests and benchmarks.

  python -m cluster.local start [--workers 2] [--worker-cpus 1] [--name dev]   (or cluster/local.sh)
  python -m cluster.local status | stop | add-worker | kill-node NAME          [--name dev]

The head is `ray start --head --block`; each worker node is its own process tree
(`cluster/node.py`) with its own temp dir, object store and raylet, joined over 127.0.0.1.
Token authentication is on: a fresh token per cluster in <state>/auth_token (mode 0600);
every node and client reads it through RAY_AUTH_TOKEN_PATH. Nothing listens beyond 127.0.0.1:
the dashboard/job server, GCS, raylets and agents all bind loopback (`listeners()` checks).
State lives in /tmp/raykd-cluster/<name>/ (short paths: Ray's Unix sockets are length-limited).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
STATE_ROOT = Path(os.environ.get("RAYKD_CLUSTER_ROOT", "/tmp/raykd-cluster"))
STARTUP_ATTEMPTS = 3  # node launches per node when Ray's start-up times out (busy machines)
BASE_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray derives loopback, never the outward IP
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
}


@dataclass
class NodeProc:
    name: str  # "head", "worker1", ...
    pid: int  # the launcher: `ray start --head --block` or `python cluster/node.py`
    temp_dir: str
    log: str
    cpus: float
    node_id: str = ""  # Ray's node id (hex), once the node has joined


@dataclass
class LocalCluster:
    state_dir: str
    gcs_port: int
    dashboard_port: int
    nodes: list[NodeProc] = field(default_factory=list)
    workers_launched: int = 0  # worker names are never reused: a killed node's log stays its own

    @property
    def address(self) -> str:
        """GCS address for drivers (`ray.init`, `--address`, $RAY_ADDRESS)."""
        return f"{LOOPBACK}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard / job server (`ray job submit --address`, JobSubmissionClient)."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def token_path(self) -> str:
        return str(Path(self.state_dir) / "auth_token")

    def token(self) -> str:
        return Path(self.token_path).read_text().strip()

    def auth_headers(self) -> dict[str, str]:
        """What JobSubmissionClient(headers=...) or any HTTP client sends."""
        return {"Authorization": f"Bearer {self.token()}"}

    def client_env(self) -> dict[str, str]:
        """Environment for a client process (`ray job submit`, `ray status`, a driver)."""
        return {**BASE_ENV, "RAY_AUTH_TOKEN_PATH": self.token_path,
                "RAY_API_SERVER_ADDRESS": self.dashboard_url, "RAY_ADDRESS": self.address}

    def node(self, name: str) -> NodeProc:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in this cluster; nodes: {[n.name for n in self.nodes]}")

    def save(self) -> None:
        Path(self.state_dir, "cluster.json").write_text(json.dumps(dataclasses.asdict(self), indent=2))
        lines = [f"export {k}={v}" for k, v in self.client_env().items()]
        Path(self.state_dir, "env.sh").write_text("\n".join(lines) + "\n")


def load(name: str = "dev") -> LocalCluster:
    path = STATE_ROOT / name / "cluster.json"
    if not path.is_file():
        raise SystemExit(f"no local cluster {name!r} ({path} missing); start one with "
                         f"`python -m cluster.local start --name {name}`")
    data = json.loads(path.read_text())
    data["nodes"] = [NodeProc(**n) for n in data["nodes"]]
    return LocalCluster(**data)


# ------------------------------------------------------------------------------ start


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start(name: str = "dev", workers: int = 2, worker_cpus: float = 1, head_cpus: float = 0,
          object_store_mb: int = 200, timeout: float = 180) -> LocalCluster:
    """Head + `workers` worker nodes on 127.0.0.1 with a new auth token; returns when all are up.

    head_cpus=0 keeps work off the head (job drivers still run there), as on a real cluster.
    """
    state = STATE_ROOT / name
    if len(str(state)) > 34:  # + /worker9/session_<date>_<pid>/sockets/plasma_store <= 107 bytes
        raise SystemExit(f"{state}: too long for Ray's Unix socket paths; use a shorter --name "
                         "(or $RAYKD_CLUSTER_ROOT)")
    if (state / "cluster.json").is_file():
        raise SystemExit(f"cluster {name!r} already exists ({state}); stop it first "
                         f"(`python -m cluster.local stop --name {name}`) or pick another --name")
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True, mode=0o700)
    fd = os.open(state / "auth_token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    cluster = LocalCluster(str(state), gcs_port=free_port(), dashboard_port=free_port())
    try:
        _start_head(cluster, head_cpus, object_store_mb, timeout)
        added = [_launch_worker(cluster, worker_cpus, object_store_mb) for _ in range(workers)]
        _join(cluster, added, 1 + workers, worker_cpus, object_store_mb, timeout)
    except BaseException:
        stop(cluster, grace=5)
        raise
    return cluster


def _node_env(cluster: LocalCluster) -> dict[str, str]:
    env = {**os.environ, **BASE_ENV, "RAY_AUTH_TOKEN_PATH": cluster.token_path,
           "GLOO_SOCKET_IFNAME": "lo",  # torch.distributed's gloo sockets of Train workers: loopback
           # `python` in a job's entrypoint is this interpreter (the venv), as an image's would be
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    for key in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)  # a caller's token or address must not leak into the nodes
    # Ray Train's controller runs on a node: poll workers every 0.25 s, not 2 s (as
    # pipeline/__init__.py sets for a local Ray; each report and each run's end waits for a poll)
    env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    return env


def _launch(cluster: LocalCluster, name: str, cmd: list[str], temp_dir: Path, cpus: float) -> NodeProc:
    log = Path(cluster.state_dir) / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_node_env(cluster),
                                cwd=cluster.state_dir, start_new_session=True)
    node = NodeProc(name, proc.pid, str(temp_dir), str(log), cpus)
    cluster.nodes.append(node)
    cluster.save()
    return node


def _start_head(cluster: LocalCluster, cpus: float, object_store_mb: int, timeout: float) -> None:
    temp_dir = Path(cluster.state_dir) / "head"
    ray = str(Path(sys.executable).with_name("ray"))
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        cmd = [ray, "start", "--head", "--block", f"--node-ip-address={LOOPBACK}",
               f"--port={cluster.gcs_port}", f"--dashboard-host={LOOPBACK}",
               f"--dashboard-port={cluster.dashboard_port}", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0",
               f"--num-cpus={cpus:g}", "--num-gpus=0", f"--object-store-memory={object_store_mb * 2**20}",
               f"--temp-dir={temp_dir}", "--disable-usage-stats", "--include-dashboard=true"]
        node = _launch(cluster, "head", cmd, temp_dir, cpus)
        try:
            _wait(lambda: _alive_nodes(cluster) >= 1, [node], timeout, "the head to serve the job API")
            return
        except RuntimeError:
            if attempt == STARTUP_ATTEMPTS or not _startup_timed_out(node):
                raise
            stop_nodes(cluster, [node], grace=5)
            cluster.gcs_port, cluster.dashboard_port = free_port(), free_port()


def _startup_timed_out(node: NodeProc) -> bool:
    """Ray gives a raylet 30 s to register with the GCS (fixed in Ray): an overloaded machine
    misses that, and starting the node again is the remedy."""
    return "timed out during startup" in _tail(node.log, 400)


def add_worker(cluster: LocalCluster, cpus: float = 1, object_store_mb: int = 200,
               timeout: float = 180) -> NodeProc:
    """One more worker node (also how a test replaces a killed node); returns once it has joined."""
    expected = _alive_nodes(cluster) + 1
    return _join(cluster, [_launch_worker(cluster, cpus, object_store_mb)], expected, cpus,
                 object_store_mb, timeout)[0]


def _join(cluster: LocalCluster, nodes: list[NodeProc], expected: int, cpus: float,
          object_store_mb: int, timeout: float) -> list[NodeProc]:
    """Wait until `expected` nodes are alive; relaunch workers whose start-up timed out."""
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        try:
            _wait(lambda: _alive_nodes(cluster) >= expected, nodes, timeout, "the worker nodes to join")
            break
        except RuntimeError:
            dead = [n for n in nodes if not _running(n.pid)]
            if attempt == STARTUP_ATTEMPTS or not dead or not all(map(_startup_timed_out, dead)):
                raise
            stop_nodes(cluster, dead, grace=5)
            nodes = [n for n in nodes if n not in dead] + [_launch_worker(cluster, cpus, object_store_mb)
                                                          for _ in dead]
    _record_node_ids(cluster)
    return nodes


def _launch_worker(cluster: LocalCluster, cpus: float, object_store_mb: int) -> NodeProc:
    cluster.workers_launched += 1
    name = f"worker{cluster.workers_launched}"
    temp_dir = Path(cluster.state_dir) / name
    cmd = [sys.executable, str(Path(__file__).with_name("node.py")), f"--address={cluster.address}",
           f"--num-cpus={cpus:g}", f"--object-store-mb={object_store_mb}", f"--temp-dir={temp_dir}",
           f"--agent-port={free_port()}", "--resources", json.dumps({"worker_node": 1})]
    return _launch(cluster, name, cmd, temp_dir, cpus)


def _record_node_ids(cluster: LocalCluster) -> None:
    """Fill in NodeProc.node_id: the head from the GCS, workers from their launcher's log."""
    for node in cluster.nodes:
        if node.name == "head":
            node.node_id = next(n["node_id"] for n in alive_nodes(cluster) if n["is_head_node"])
        else:
            deadline = time.monotonic() + 30  # the line follows the node's registration
            while not (found := re.findall(r"worker node (\w+) up", Path(node.log).read_text(errors="replace"))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{node.name} joined but never logged its node id; see {node.log}")
                time.sleep(0.2)
            node.node_id = found[-1]  # the log is appended to: the last launch is this one
    cluster.save()


def _wait(ready, nodes: list[NodeProc], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            if not _running(node.pid):
                raise RuntimeError(f"{node.name} exited while waiting for {what}; see {node.log}:\n"
                                   + _tail(node.log))
        try:
            if ready():
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            pass  # not up yet
        time.sleep(1)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; see "
                       + ", ".join(n.log for n in nodes))


def api(cluster: LocalCluster, path: str, timeout: float = 10) -> dict:
    """GET a dashboard endpoint with the cluster's token."""
    req = urllib.request.Request(cluster.dashboard_url + path, headers=cluster.auth_headers())
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def alive_nodes(cluster: LocalCluster) -> list[dict]:
    """Nodes the GCS reports ALIVE (via the dashboard's state API)."""
    data = api(cluster, "/api/v0/nodes?limit=100")["data"]["result"]["result"]
    return [n for n in data if n["state"] == "ALIVE"]


def _alive_nodes(cluster: LocalCluster) -> int:
    return len(alive_nodes(cluster))


# ------------------------------------------------------------------------------ stop / kill


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_node(cluster: LocalCluster, name: str) -> int:
    """SIGKILL a node's whole process tree at once (a machine failing); returns processes killed."""
    import psutil

    node = cluster.node(name)
    procs = _tree(node.pid)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    cluster.nodes.remove(node)
    cluster.save()
    return len(procs)


def stop_nodes(cluster: LocalCluster, nodes: list[NodeProc], grace: float = 10) -> None:
    """SIGTERM the nodes' launchers together (Ray drains each node and stops its processes);
    SIGKILL whatever is left after `grace` seconds."""
    import psutil

    trees = [_tree(n.pid) for n in nodes]
    for procs in trees:
        if procs:
            try:
                procs[0].send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
    everything = [p for procs in trees for p in procs]
    _, alive = psutil.wait_procs(everything, timeout=grace)
    late = [c for n in nodes for c in _tree(n.pid)]  # workers started since
    for p in {*alive, *late}:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs([*alive, *late], timeout=5)
    for n in nodes:
        cluster.nodes.remove(n)
    cluster.save()


def stop(cluster: LocalCluster, keep_logs: bool = False, grace: float = 10) -> None:
    """Workers first (together), then the head; then remove the state dir (token included).

    grace: seconds each group gets to drain and exit before SIGKILL (tests pass a few)."""
    stop_nodes(cluster, [n for n in cluster.nodes if n.name != "head"], grace)
    stop_nodes(cluster, [n for n in cluster.nodes if n.name == "head"], grace)
    state = Path(cluster.state_dir)
    if keep_logs:
        for p in state.iterdir():
            if p.suffix != ".log":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    else:
        shutil.rmtree(state, ignore_errors=True)


# ------------------------------------------------------------------------------ checks


def listeners(cluster: LocalCluster) -> list[tuple[str, int, str, int]]:
    """(ip, port, process name, pid) of every listening TCP socket of the cluster's processes."""
    import psutil

    out = []
    for node in cluster.nodes:
        for p in _tree(node.pid):
            try:
                conns = p.net_connections(kind="inet")
                pname = p.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            out += [(c.laddr.ip, c.laddr.port, pname, p.pid) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def off_loopback(listening: list[tuple[str, int, str, int]]) -> list[tuple[str, int, str, int]]:
    """Listeners on anything but 127.0.0.1 (IPv4-mapped ::ffff:127.0.0.1 counts as loopback)."""
    return [entry for entry in listening if entry[0] not in (LOOPBACK, f"::ffff:{LOOPBACK}")]


def _tail(path: str, n: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------ CLI


def describe(cluster: LocalCluster) -> str:
    nodes = ", ".join(f"{n.name} ({n.cpus:g} CPU, pid {n.pid})" for n in cluster.nodes)
    return f"""Ray cluster on {LOOPBACK}: {nodes}
  GCS address (drivers, ray status):    {cluster.address}
  dashboard / job server:               {cluster.dashboard_url}
  auth token file (mode 0600):          {cluster.token_path}

Use it from a shell (sets RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, RAY_API_SERVER_ADDRESS, RAY_ADDRESS):
  source {cluster.state_dir}/env.sh
  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
      python -m jobs.cache --list cache.root=/abs/path/cache
  ray job logs -f JOB_ID        ray job status JOB_ID        ray job stop JOB_ID
Stop it:  python -m cluster.local stop --name {Path(cluster.state_dir).name}"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["start", "stop", "status", "add-worker", "kill-node"])
    p.add_argument("node", nargs="?", help="node name for kill-node (e.g. worker1)")
    p.add_argument("--name", default="dev", help="cluster name; state in /tmp/raykd-cluster/NAME "
                   "(default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="worker nodes to start")
    p.add_argument("--worker-cpus", type=float, default=1, help="CPUs each worker node offers")
    p.add_argument("--head-cpus", type=float, default=0, help="CPUs the head offers (0: drivers only)")
    p.add_argument("--object-store-mb", type=int, default=200)
    p.add_argument("--keep-logs", action="store_true", help="stop: keep the node logs")
    args = p.parse_args(argv)
    if args.command == "start":
        cluster = start(args.name, args.workers, args.worker_cpus, args.head_cpus, args.object_store_mb)
        print(describe(cluster))
        return
    cluster = load(args.name)
    if args.command == "stop":
        stop(cluster, keep_logs=args.keep_logs)
        print(f"stopped cluster {args.name!r}")
    elif args.command == "status":
        print(describe(cluster))
        print(f"alive nodes (GCS): {len(alive_nodes(cluster))}")
        bad = off_loopback(listeners(cluster))
        print("listeners beyond 127.0.0.1: " + (str(bad) if bad else "none"))
    elif args.command == "add-worker":
        node = add_worker(cluster, args.worker_cpus, args.object_store_mb)
        print(f"added {node.name} (pid {node.pid})")
    elif args.command == "kill-node":
        if not args.node or args.node == "head":
            raise SystemExit("kill-node needs a worker name, e.g. `kill-node worker1`")
        print(f"killed {args.node}: {kill_node(cluster, args.node)} processes")


if __name__ == "__main__":
    main()
