"""Every place the project reaches past Ray's public API, in one module, each checked against the Ray version it
was written for (pyproject.toml pins that version; another one may have moved or changed these internals, so
using them there is refused with one line instead of misbehaving).

- `raise_tune_idle_wait`: Tune's controller loop (`TuneController.step`) waits at most 0.1 s for its next
  event and then does its bookkeeping anyway; ten empty rounds a second cost the driver more CPU than all
  the events of a toy trial. Ray has no setting for it: the wait is raised in its actor manager.
- `init_local_ray`: `ray.init(_node_ip_address=...)` puts a local Ray's node on the loopback address (its
  dashboard-less local cluster is then reachable from this machine only).
- `TRAIN_CHECKPOINT_KEY`: the metric under which Ray's `TuneReportCallback` passes a Ray Train job's
  checkpoint path to Tune.
- `trial_actor_count`: the GCS actor table (a debugging API), for the cluster simulation's diagnostics.
"""

from __future__ import annotations

from typing import Any

WRITTEN_FOR = "2.60"  # the Ray minor version these internals were read in
TRAIN_CHECKPOINT_KEY = "checkpoint_path"  # ray.tune.integration.ray_train.CHECKPOINT_PATH_KEY


class RayVersionError(RuntimeError):
    pass


def check_ray_version(what: str) -> None:
    """Refuse (one line) to use a Ray internal on a Ray other than the one it was written for."""
    import ray

    if ".".join(ray.__version__.split(".")[:2]) != WRITTEN_FOR:
        raise RayVersionError(
            f"resurgence uses a Ray internal ({what}) written for Ray {WRITTEN_FOR}, but Ray {ray.__version__} is "
            f"installed: install ray[tune,default]=={WRITTEN_FOR}.* (as pyproject.toml pins it)"
        )


def raise_tune_idle_wait(seconds: float) -> None:
    """Let Tune's controller loop wait up to `seconds` for its next event (an event still ends the wait at
    once; a timeout of 0, a poll, stays a poll). Once per process."""
    check_ray_version("RayActorManager.next, Tune's event wait")
    from ray.air.execution._internal.actor_manager import RayActorManager

    if getattr(RayActorManager.next, "calmed", False):
        return
    wait_for_event = RayActorManager.next

    def next_event(self: Any, timeout: float | None = None) -> bool:
        if timeout is not None and 0 < timeout < seconds:
            timeout = seconds
        return wait_for_event(self, timeout=timeout)

    next_event.calmed = True  # type: ignore[attr-defined]
    RayActorManager.next = next_event


def init_local_ray(node_ip: str, **kwargs: Any) -> None:
    """`ray.init` of a new local Ray whose node listens on `node_ip`; `kwargs` go to ray.init."""
    check_ray_version("ray.init(_node_ip_address=...)")
    import ray

    ray.init(address="local", _node_ip_address=node_ip, **kwargs)


def trial_actor_count() -> int:
    """Tune trial actors Ray created in all (alive or dead), from the GCS actor table."""
    check_ray_version("ray._private.state.actors")
    from ray._private.state import actors

    return sum(1 for a in actors().values() if "ImplicitFunc" in a.get("ActorClassName", ""))
