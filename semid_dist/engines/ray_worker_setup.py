"""Set-up run by each worker process of the embedded Ray as it starts (`ray_session`'s
`WORKER_SETUP`): the job's tasks and actors, Ray Data's and Ray Train's own among them. It
imports nothing but the standard library: the engine's modules would cost each of those
processes ~0.4 s of imports."""

from __future__ import annotations

import logging
import os
import sys

# Ray Train's helper that removes a fit's placement group should its controller die
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
STATE_API_WARNING = "Failed to query Ray Train Controller actor state"
# s3fs's client, aiobotocore over botocore (their credentials and endpoint lines)
STORAGE_CLIENT_LOGGERS = ("aiobotocore", "botocore")


def _not_the_state_api_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(STATE_API_WARNING)


def set_up_worker() -> None:
    """No warning from the Ray Train helper that asks Ray's State API, every second of a
    fit, whether the training's controller is alive. The State API is served by the
    dashboard, which the embedded Ray runs without, so each of its questions failed with a
    warning on the build's console (5-6 lines a build). Its other lines still show. Nor the
    object store client's INFO lines (`Found credentials in environment variables.`, from
    each Ray Train worker reading s3://): its warnings and errors still show."""
    logging.getLogger(CLEANER_LOGGER).addFilter(_not_the_state_api_warning)
    for name in STORAGE_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    _ask_this_ray()


def _ask_this_ray() -> None:
    """Ray's State API, asked without an address (that helper asks so), finds the Ray to
    ask by `RAY_ADDRESS`, else the cluster `ray start` last started on this machine
    (`/tmp/ray/ray_current_cluster`), else the one Ray running here: with another Ray on
    the machine it asked that one (`Found multiple active Ray instances ...` on the
    console each second; a State API there would not know this Ray's training and its
    placement group would be removed) or failed with a traceback (two Rays, neither by
    `ray start`). Each worker of the embedded Ray names its own Ray's address instead. The
    worker is connected when its set-up runs, so `ray` is already imported."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
