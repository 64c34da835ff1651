"""Where the Ray executor's ranks go: joining (or starting) a Ray cluster, and one placement-group
bundle per rank.

Placement is set by environment variables so that the command line is the same on a laptop and a
cluster (docs/deployment.md): PAGELLM_RAY_PLACEMENT_STRATEGY (PACK), PAGELLM_RAY_CPUS_PER_RANK
(the cluster's CPUs over the ranks) and PAGELLM_RAY_PLACEMENT_TIMEOUT_S (60). A placement group
the cluster cannot hold fails after the timeout, naming the layout and the cluster's resources.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

logger = logging.getLogger(__name__)

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class PlacementSettings:
    strategy: str
    cpus_per_rank: int  # 0: the cluster's CPUs over the ranks, decided once connected
    timeout_s: float


def placement_settings(environ=None) -> PlacementSettings:
    """The PAGELLM_RAY_* variables, checked; a bad value is a ValueError naming the variable."""
    env = os.environ if environ is None else environ
    strategy = env.get("PAGELLM_RAY_PLACEMENT_STRATEGY", "PACK").strip().upper()
    if strategy not in STRATEGIES:
        raise ValueError(f"PAGELLM_RAY_PLACEMENT_STRATEGY must be one of {STRATEGIES}, got {strategy!r}")
    try:
        cpus = int(env.get("PAGELLM_RAY_CPUS_PER_RANK", "0"))
        timeout = float(env.get("PAGELLM_RAY_PLACEMENT_TIMEOUT_S", "60"))
    except ValueError as exc:
        raise ValueError(f"PAGELLM_RAY_CPUS_PER_RANK must be an integer and PAGELLM_RAY_PLACEMENT_TIMEOUT_S "
                         f"a number of seconds: {exc}") from None
    if cpus < 0:
        raise ValueError(f"PAGELLM_RAY_CPUS_PER_RANK must be >= 1 (or unset), got {cpus}")
    if timeout <= 0:
        raise ValueError(f"PAGELLM_RAY_PLACEMENT_TIMEOUT_S must be > 0, got {timeout}")
    return PlacementSettings(strategy, cpus, timeout)


def connect() -> bool:
    """Joins the Ray cluster this process already uses, the one RAY_ADDRESS names, or the one
    `ray start` left on this machine; else starts a local instance. Returns whether we started it
    (then we, and only we, shut it down)."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return False
    try:
        ray.init(address="auto")
        return False
    except ConnectionError:
        pass  # no cluster on this machine
    logger.info("no Ray cluster found: starting a local Ray instance for this engine")
    ray.init(include_dashboard=False)
    return True


def rank_bundle(device: str, cpus_per_rank: int) -> dict[str, float]:
    return {"GPU": 1} if device.startswith("cuda") else {"CPU": cpus_per_rank}


def default_cpus_per_rank(world_size: int) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // world_size)


def reserve(world_size: int, device: str, settings: PlacementSettings, layout: str) -> tuple[PlacementGroup, int]:
    """A ready placement group with one bundle per rank, in rank order, and the CPUs per rank.
    Raises RuntimeError (after removing the group) when it is not placed within the timeout."""
    cpus = settings.cpus_per_rank or default_cpus_per_rank(world_size)
    bundle = rank_bundle(device, cpus)
    group = placement_group([dict(bundle) for _ in range(world_size)], strategy=settings.strategy)
    ready, _ = ray.wait([group.ready()], timeout=settings.timeout_s)
    if not ready:
        remove_placement_group(group)
        raise RuntimeError(
            f"the Ray cluster cannot place the layout {layout}: {world_size} bundles of {bundle} "
            f"(strategy {settings.strategy}) were not placed within {settings.timeout_s:g} s "
            f"(PAGELLM_RAY_PLACEMENT_TIMEOUT_S); the cluster has {_resources(ray.cluster_resources())} "
            f"on {len([n for n in ray.nodes() if n.get('Alive')])} node(s), "
            f"{_resources(ray.available_resources())} available")
    return group, cpus


def _resources(resources: dict) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(shown.items())) or "no CPU or GPU"
