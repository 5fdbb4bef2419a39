"""Ray start-up in one place: a local Ray on 127.0.0.1, or an existing cluster."""
from __future__ import annotations

import logging
import os

from pipeline.config import RayConfig

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps a local cluster on loopback
    "RAY_USAGE_STATS_ENABLED": "0",
}
# The address of the Ray that init_ray started without a dashboard, in its driver and in each of
# its workers (set by the setup hook); a Ray started elsewhere, e.g. by `ray start` from a
# process holding this variable, has another address.
NO_DASHBOARD_ENV = "RAYKD_RAY_WITHOUT_DASHBOARD"


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
                 runtime_env={"worker_process_setup_hook": _worker_setup_hook()})
        os.environ[NO_DASHBOARD_ENV] = ray.get_runtime_context().gcs_address
    _quiet_ray_data()
    return ray.get_runtime_context().gcs_address


def _worker_setup_hook():
    """A setup hook for every worker process of a local Ray (started without the dashboard): it
    marks the process as one of this Ray's (NO_DASHBOARD_ENV: see `trainer`, which therefore
    starts no placement-group cleaner here) and points it at its own Ray (with two local Rays on
    one machine, an address-less lookup failed to pick one: "multiple active Ray instances").
    Defined inside a function so that Ray ships it by value (workers need not import this
    package to run it)."""
    env = NO_DASHBOARD_ENV

    def setup() -> None:
        import os

        import ray

        address = ray.get_runtime_context().gcs_address
        os.environ.setdefault("RAY_ADDRESS", address)
        os.environ[env] = address
    return setup


def _quiet_ray_data() -> None:
    """Ray Data's per-operator bars flood logs; our loops print their own progress."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # ...and without this, Ray Data warns once per process that they are off
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def trainer(train_fn, config: dict, **kwargs):
    """Ray Train's TorchTrainer, without two helper actors a run of ours never uses; each is a
    process of its own that costs 1.5-2 s of CPU per training run (measured over the test suite:
    47 runs, 76 s in dataset managers and 93 s in placement-group cleaners):
    - the dataset manager, which Ray Train starts even when no Ray Dataset is passed (each
      worker reads its own share of the cache: pipeline.train_data);
    - on a Ray without a dashboard (the local Ray init_ray starts), the placement-group
      cleaner: it frees a run's workers when its controller dies, and finds out by polling the
      dashboard's state API every second, which such a Ray does not serve. Clusters keep it."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    unused = (DatasetsCallback,) if not kwargs.get("datasets") else ()
    unused += (PlacementGroupCleanerCallback,) if not has_dashboard() else ()

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]

    return LeanTorchTrainer(train_fn, train_loop_config=config, torch_config=torch_config(), **kwargs)


def has_dashboard() -> bool:
    """False on the Ray that init_ray started without a dashboard (in its driver and workers):
    it serves no state or jobs API. True elsewhere (a cluster, or a Ray started by others)."""
    import ray

    return os.environ.get(NO_DASHBOARD_ENV) != ray.get_runtime_context().gcs_address


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
