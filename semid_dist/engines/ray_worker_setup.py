"""Set-up run by each worker process of the embedded Ray as it starts (`ray_session`'s
`WORKER_SETUP`). It imports nothing but the standard library: Ray's own helper processes run
it too, and the engine's modules would cost each of them ~0.4 s of imports."""

from __future__ import annotations

import logging

# Ray Train's helper that removes a fit's placement group should its controller die
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_state_api_users() -> None:
    """No warnings from the Ray Train helper that asks Ray's State API, every second of a
    fit, whether the training's controller is alive. The State API is served by the
    dashboard, which the embedded Ray runs without, so each of its questions failed with a
    warning on the build's console ("Failed to query Ray Train Controller actor state", 5-6
    lines a build). Its errors still show."""
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)
