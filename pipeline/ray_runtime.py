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
        ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
    _quiet_ray_data()
    return ray.get_runtime_context().gcs_address


def _quiet_ray_data() -> None:
    """Ray Data's per-operator bars flood logs; our loops print their own progress."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
