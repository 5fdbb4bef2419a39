"""Ray start-up in one place: a local Ray on 127.0.0.1, or an existing cluster."""
from __future__ import annotations

import logging
import os

from pipeline.config import RayConfig

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps a local cluster on loopback
    "RAY_USAGE_STATS_ENABLED": "0",
}


def init_ray(cfg: RayConfig, address: str = "") -> str:
    """Connect to `address` / cfg.address / $RAY_ADDRESS, else start Ray on 127.0.0.1.

    Returns the address connected to. Safe to call twice (the second call is a no-op).
    """
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    target = address or cfg.address or os.environ.get("RAY_ADDRESS", "")
    if target:
        ray.init(address=target, logging_level=logging.WARNING)
    else:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pair sockets on loopback too
        # A local machine is not preempted: skip the watcher actor (one more process, ~1 s of
        # start-up, per training run). Cluster runs keep it.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # address="local": always a Ray of our own. With no address, ray.init joins the latest
        # cluster started on this machine by `ray start` (/tmp/ray/ray_current_cluster) if one
        # is up: a job run beside a test's cluster joined it and failed on num_cpus.
        ray.init(address="local", num_cpus=cfg.num_cpus or None, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
                 runtime_env={"worker_process_setup_hook": _quiet_worker_logs_hook()})
    _quiet_ray_data()
    return ray.get_runtime_context().gcs_address


def _quiet_worker_logs_hook():
    """A setup hook for every worker process of a local Ray (started without the dashboard):
    Ray Train's placement-group cleaner polls the dashboard's state API every second and logs a
    warning each time it is absent, burying the training progress; with two local Rays on one
    machine it also failed on every poll to pick one ("multiple active Ray instances"), so each
    worker is pointed at its own. Defined inside a function so that Ray ships it by value
    (workers need not import this package to run it)."""
    def quiet() -> None:
        import logging as log
        import os

        import ray

        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
        log.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
            log.ERROR)
    return quiet


def _quiet_ray_data() -> None:
    """Ray Data's per-operator bars flood logs; our loops print their own progress."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def torch_config():
    """Ray Train's TorchConfig, but rank 0's rendezvous store listens on the node's Ray address
    only: torch's TCPStore otherwise binds every interface (`*:port`), which breaks a cluster
    kept on 127.0.0.1 and exposes the port on real clusters."""
    from dataclasses import dataclass

    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class _NodeAddressStoreBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            import ray.train.torch.config as tc

            original = tc.get_address_and_port
            tc.get_address_and_port = _serve_store_on_node_address  # runs on worker 0
            try:
                super().on_start(worker_group, backend_config)
            finally:
                tc.get_address_and_port = original

    @dataclass
    class NodeAddressTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _NodeAddressStoreBackend

    return NodeAddressTorchConfig()


_STORES: list = []  # keeps rank 0's store (and its socket) alive in the worker process


def _serve_store_on_node_address() -> tuple[str, int]:
    """On rank 0: a TCPStore server on a socket bound to this node's Ray address; torch's
    rendezvous then connects to it as a client (TORCHELASTIC_USE_AGENT_STORE)."""
    import datetime
    import socket

    import ray
    from torch.distributed import TCPStore

    addr = ray.util.get_node_ip_address()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((addr, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = TCPStore(addr, port, is_master=True, master_listen_fd=sock.fileno(),
                     wait_for_workers=False, timeout=datetime.timedelta(seconds=1800))
    _STORES.append((sock, store))
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    return addr, port
