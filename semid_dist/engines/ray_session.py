"""The Ray session the engine works in: a running cluster (`ray.address`), or an embedded
local Ray started from the `ray:` settings, with the workers' environment (memory settings)
and the driver's console kept to the build's own progress. Ray is imported inside the
functions only; the known start-up and connection failures are one-line ConfigErrors."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator

from semid_dist.config import BuildConfig
from semid_dist.errors import ConfigError, one_line
from semid_dist.io.fs import tcp_refusal
from semid_dist.memory import huge_pages, worker_env

# run by each worker process of the embedded Ray as it starts, the job's tasks and actors and
# Ray Data's and Ray Train's own (`ray_worker_setup`: a module that imports nothing else)
WORKER_SETUP = "semid_dist.engines.ray_worker_setup.set_up_worker"
# where Ray's workers look for it (what `runtime_env={"worker_process_setup_hook": ...}`
# sets, without a runtime environment's cost: `_started_with`)
WORKER_SETUP_VAR = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"


AUTH_MODE = "RAY_AUTH_MODE"
_auth_mode_set = False  # whether this process's RAY_AUTH_MODE is the engine's (`_auth_mode`)


def _auth_mode(mode: str | None) -> None:
    """Set (None: take back) this process's RAY_AUTH_MODE for the Ray the engine starts or
    joins, refreshing Ray's cached configuration as Ray does where it enables tokens itself
    (its C++ side reads the mode once: set after Ray's first use, it was not seen)."""
    global _auth_mode_set
    if mode is None:
        os.environ.pop(AUTH_MODE, None)
    else:
        os.environ[AUTH_MODE] = mode
    _auth_mode_set = mode is not None
    with contextlib.suppress(ImportError, AttributeError):  # (another Ray: as it is)
        from ray._raylet import Config

        Config.initialize("")


def ray_init(cfg: BuildConfig) -> bool:
    """Connect to / start Ray. Returns True when this call started it (so it must stop it:
    `ray_shutdown`)."""
    import ray

    if ray.is_initialized():
        return False
    with _sigterm_kept():
        return _ray_init(cfg, ray)


def ray_shutdown(*, interrupted: bool = False) -> None:
    """Stop the Ray `ray_init` started, and take back the RAY_AUTH_MODE the embedded one
    set (a later build in this process attaching to a cluster leaves it to Ray).
    `interrupted` (a Ctrl-C or SIGTERM stops the build): the workers' output is no longer
    printed here first; the workers Ray stops print what their interpreters say as they die
    (a Ray Train v1 trainer's `Exception ignored in ... Traceback`), which is not the
    build's."""
    import ray

    if interrupted:
        with contextlib.suppress(Exception):  # (Ray's own handler of its workers' lines)
            from ray._private.worker import global_worker_stdstream_dispatcher

            global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    ray.shutdown()
    if _auth_mode_set:
        _auth_mode(None)


@contextlib.contextmanager
def _sigterm_kept() -> Iterator[None]:
    """`ray.init` sets a SIGTERM handler of its own, in the main thread (`sys.exit`: the
    process died past the command's clean-up and its line, and Ray's C++ handler printed a
    stack dump): a Python handler in place before it (the `semid` command's) is put back.
    Where there was none (the library called from a script), Ray's stays."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


def _ray_init(cfg: BuildConfig, ray) -> bool:  # noqa: ANN001 (the ray module)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    check_startable(cfg)
    try:
        _start_or_join(cfg, ray)
    except BaseException:  # (a Ray not joined nor started: no engine to stop it)
        if _auth_mode_set:
            _auth_mode(None)
        raise
    return True


def _start_or_join(cfg: BuildConfig, ray) -> None:  # noqa: ANN001 (the ray module)
    """`ray.init`: join the cluster at `ray.address`, else start an embedded Ray; what Ray
    refuses, one ConfigError line."""
    from ray.exceptions import AuthenticationError

    if cfg.ray.address:
        _match_local_auth(cfg.ray.address)
        try:
            ray.init(address=cfg.ray.address, log_to_driver=True)
        except (ConnectionError, TimeoutError) as exc:
            raise ConfigError(_connect_error(cfg.ray.address, exc)) from exc
        except AuthenticationError as exc:  # (no token to send: Ray's own check)
            raise ConfigError(_connect_error(cfg.ray.address, ConnectionError(
                f"AuthenticationError: {_one_line(exc)}"))) from exc
        except ValueError as exc:  # an address Ray cannot use as given
            raise ConfigError(f"ray.address={cfg.ray.address}: {_one_line(exc)}; give the "
                              "cluster's address as `ray start --head` prints it (host:port), "
                              "or auto") from exc
        except RuntimeError as exc:
            if "Version mismatch" not in str(exc):
                raise
            raise ConfigError(f"ray.address={cfg.ray.address}: {_one_line(exc)}; run this "
                              "driver with the cluster's Ray and Python versions, or submit the "
                              "job to it (`ray job submit`)") from exc
    else:
        # this process's own Ray asks no token of it (a cluster's is left to Ray: a token
        # in ~/.ray, where `ray start` enables token authentication, is used)
        if AUTH_MODE not in os.environ:
            _auth_mode("disabled")
        # Ray Train's preemption watcher polls for cluster nodes about to be preempted; this
        # Ray's one node is this machine. On 2 cores its actor's start-up (a Python process,
        # ~1 core for 2-3 s) ran beside the fit's first layer, slowing it ~1.7x
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray's processes inherit the huge-page switch (`memory.huge_pages`) and the variables
        with huge_pages(cfg.encode.huge_pages), _started_with({
                **worker_env(cfg.encode.reuse_memory, cfg.encode.huge_pages),
                WORKER_SETUP_VAR: WORKER_SETUP}):
            try:
                # "local": a Ray of its own even where `ray start` left a cluster's address
                # for a bare `ray.init()` to connect to (/tmp/ray/ray_current_cluster)
                ray.init(address="local", num_cpus=cfg.ray.num_cpus or os.cpu_count(),
                         include_dashboard=False,
                         object_store_memory=cfg.ray.object_store_memory_mb * 2**20,
                         configure_logging=False, log_to_driver=True)
            except ValueError as exc:  # settings this machine cannot give Ray
                raise ConfigError(f"ray.num_cpus / ray.object_store_memory_mb: Ray cannot "
                                  f"start here with {cfg.ray.num_cpus or os.cpu_count()} CPUs "
                                  f"and ray.object_store_memory_mb="
                                  f"{cfg.ray.object_store_memory_mb} ({_one_line(exc)}); lower "
                                  "them") from exc
            except OSError as exc:  # e.g. a temporary folder too deep for Ray's sockets
                raise ConfigError(f"engine: ray could not start a local Ray on this machine "
                                  f"({_one_line(exc)}); mend what it names, or use engine: "
                                  "local") from exc


def _match_local_auth(address: str) -> None:
    """For a cluster whose head runs on this machine, with RAY_AUTH_MODE unset: this
    driver's RAY_AUTH_MODE set to the head's, as its process runs with it (taken back as
    the engine stops). Ray enables token authentication for `auto` wherever a token exists
    (~/.ray/auth_token, which any bare `ray.init()` on the machine writes): a cluster
    started before that token, without one, let the build hang ~60 s in the fit and fail
    with a traceback. It never does for a host:port, which a cluster with a token then
    refused (Ray sends its token only to a cluster it finds itself; this one's head is a
    process of this machine)."""
    if AUTH_MODE in os.environ or (address == "auto" and os.environ.get("RAY_ADDRESS")):
        return
    if address == "auto":
        address = _local_cluster(address) or ""
    host, _, port = address.rpartition(":")
    mode = _local_head_auth(host.strip("[]"), int(port)) if port.isdigit() else None
    if mode == "disabled" or (mode == "token" and _has_token()):  # (else: as Ray chooses,
        _auth_mode(mode)  # and a refusal is `_connect_error`'s line)


def _has_token() -> bool:
    """Whether this driver has a token to send, where Ray looks for one."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.isfile(path)


def _local_head_auth(host: str, port: int) -> str | None:
    """`token` or `disabled`: how the Ray head on this machine whose GCS serves `host:port`
    authenticates (its process's RAY_AUTH_MODE: `ray start` sets it to token where it
    enables tokens); None where no such process runs here, or its environment cannot be
    read (another user's)."""
    try:
        ip = socket.gethostbyname(host) if host else ""
    except OSError:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else ()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
            if not (args[0].endswith("gcs_server") and f"--gcs_server_port={port}" in args):
                continue
            node_ip = next((a.split("=", 1)[1] for a in args
                            if a.startswith("--node-ip-address=")), "")
            if ip != node_ip and not ip.startswith("127."):
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        return "token" if env.get(AUTH_MODE.encode(), b"").lower() == b"token" else "disabled"
    return None


def _one_line(exc: BaseException) -> str:
    return one_line(exc).rstrip(".")


def quiet_datasets() -> None:
    """No Ray Data progress report on this driver's console: off a terminal Ray Data logs
    one of a dozen lines every few seconds per dataset, which buried the build's own
    progress lines (`encode: 3/30 shards ...`). Its console shows warnings and up; its INFO
    lines still go to its log file (`ray-data.log` of the Ray session)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled"
    data = logging.getLogger("ray.data")
    consoles = [h for h in data.handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)]
    for handler in consoles:
        handler.setLevel(logging.WARNING)
    if not consoles:  # a Ray whose Ray Data logs through other handlers
        data.setLevel(logging.WARNING)


def check_startable(cfg: BuildConfig) -> None:
    """What `_ray_init` checks before it starts or joins Ray (also for a dry run, which
    starts nothing): a cluster's `ray.address` that accepts connections, and no RAY_ADDRESS
    without it (Ray would join that cluster, not start one here)."""
    if cfg.ray.address:
        _check_client(cfg.ray.address)
        _check_reachable(cfg.ray.address)
        return
    if os.environ.get("RAY_ADDRESS"):
        raise ConfigError(f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} is set (as for a `ray job "
                          "submit` job) but ray.address is not: set ray.address=auto to run "
                          "on that cluster, or unset RAY_ADDRESS to run on an embedded local "
                          "Ray")
    # the embedded Ray's CPUs are known before it starts (`RayEngine` checks a cluster's)
    check_fit_cpus(cfg, cfg.ray.num_cpus or os.cpu_count() or 1)


def check_fit_cpus(cfg: BuildConfig, have: float) -> None:
    """A fit (none where the codebooks come from a version) that takes more CPUs than an
    embedded Ray of `have`: a ConfigError (`too_few_cpus`)."""
    if not cfg.encode.from_version and (need := fit_cpus(cfg)) > have:
        raise ConfigError(too_few_cpus(cfg, need, have))


def fit_cpus(cfg: BuildConfig) -> float:
    """The CPUs a Ray Train fit takes at once: its workers', and the trainer actor's where
    Ray Train v1 runs one."""
    return _fit_resources(cfg).get("CPU", 0.0)


def fit_gpus(cfg: BuildConfig) -> float:
    """The GPUs a Ray Train fit takes at once with `fit.use_gpu`: one a worker."""
    return _fit_resources(cfg).get("GPU", 0.0)


def _fit_resources(cfg: BuildConfig) -> dict[str, float]:
    from ray.train import ScalingConfig

    fit = cfg.fit
    return ScalingConfig(num_workers=fit.num_workers, use_gpu=fit.use_gpu,
                         resources_per_worker={"CPU": fit.cpus_per_worker}).total_resources


def too_few_cpus(cfg: BuildConfig, need: float, have: float, *, cluster: bool = False) -> str:
    """A fit that takes `need` CPUs on a Ray that has `have`: an error on this machine's
    own Ray, which would wait for them forever; a warning on a `cluster`, which nodes may
    join."""
    fit = cfg.fit
    trainer = " with Ray Train's trainer" if need > fit.num_workers * fit.cpus_per_worker else ""
    msg = (f"fit.num_workers={fit.num_workers} x fit.cpus_per_worker={fit.cpus_per_worker:g} "
           f"take {need:g} CPUs{trainer} but the Ray cluster has {have:g}")
    if cluster:
        return f"{msg}: the fit waits until nodes join"
    return (f"{msg}: Ray Train would wait for them forever; lower fit.num_workers or "
            "fit.cpus_per_worker, or raise ray.num_cpus")


def _check_client(address: str) -> None:
    """A `ray://` address needs Ray Client's package (ray[client]: grpcio), which this
    project's install does not bring: a ConfigError, so that a dry run says it too (the build
    stopped on Ray's line, after the dry run had passed)."""
    env = os.environ.get("RAY_ADDRESS", "")
    if address == "auto" and env.startswith("ray://"):
        address = env  # (what Ray joins for auto)
    if address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        named = f"RAY_ADDRESS={address}" if address == env else f"ray.address={address}"
        raise ConfigError(f"{named} is a Ray Client address, and Ray Client "
                          "needs the package ray[client] (grpcio), which is not installed "
                          "here: `pip install 'ray[client]'` of the cluster's Ray version, or "
                          "submit the build to the cluster (`ray job submit`) with "
                          "ray.address=auto")


def _check_reachable(address: str) -> None:
    """Raise ConfigError at once when the cluster's `host:port` (`ray.address`, or
    RAY_ADDRESS for `auto`) accepts no TCP connection: Ray itself retries such an address for
    minutes before it gives up. Other forms (`auto` alone, `ray://...`) are left to Ray."""
    env = os.environ.get("RAY_ADDRESS")
    recorded = None  # (auto: the address Ray's record of the last `ray start` gives)
    if address == "auto" and not env:
        recorded = _local_cluster(address)
        refusal = tcp_refusal(recorded) if recorded else None
    else:
        refusal = tcp_refusal(env if address == "auto" else address)
    if refusal is not None:
        if recorded is not None:  # (a cluster stopped since, without `ray stop`)
            refusal = ConnectionError(f"{recorded}, which {_record_file()} records as the "
                                      f"cluster last started here: {refusal}")
        raise ConfigError(_connect_error(address, refusal)) from refusal


def _record_file() -> str:
    """Where Ray records the cluster `ray start` last started on this machine, for `auto`."""
    try:
        from ray._private.utils import get_ray_address_file

        return get_ray_address_file(None)
    except Exception:  # noqa: BLE001 (another Ray: said in general)
        return "Ray's temporary folder"


def _local_cluster(address: str) -> str | None:
    """The `host:port` Ray finds for `auto` without RAY_ADDRESS (the cluster last started
    on this machine, as its temporary folder records it), or None where Ray cannot say
    without connecting; a ConfigError where no cluster runs here (Ray's words: `Could not
    find any running Ray instance`), or where several run and none is recorded (Ray joins any
    one of them then: another process's embedded Ray, say)."""
    try:
        from ray._private.services import (
            canonicalize_bootstrap_address,
            find_bootstrap_address,
            find_gcs_addresses,
        )
    except ImportError:  # (another Ray: left to ray.init)
        return None
    found: list[str] = []
    with contextlib.suppress(Exception):  # (anything else: left to ray.init, which says it)
        # (Ray keeps what it found for the process's life: a notebook's Rays come and go)
        import ray._private.services as services

        services._cached_find_gcs_addresses.cache_clear()
    with contextlib.suppress(Exception):
        found = [] if find_bootstrap_address(None) else sorted(find_gcs_addresses())
    if len(found) > 1:
        raise ConfigError(
            f"ray.address=auto: {len(found)} Ray instances run on this machine "
            f"({', '.join(found)}) and `ray start` recorded none of them in Ray's temporary "
            "folder (a cluster started with --temp-dir, or another process's embedded Ray), "
            "so Ray would join any one of them; set ray.address to the cluster's host:port "
            "(the address `ray start` printed)")
    try:
        return canonicalize_bootstrap_address(address)
    except ConnectionError as exc:
        raise ConfigError(_connect_error(address, exc)) from exc
    except Exception:  # noqa: BLE001 (anything else: left to ray.init, which says it)
        return None


def _connect_error(address: str, exc: BaseException) -> str:
    """What `ray.init(address=...)` failing to connect means, with Ray's own reason (and the
    one under it: Ray wraps the cause of a failed connection in its ConnectionError)."""
    env = os.environ.get("RAY_ADDRESS")  # what Ray connects to for `auto`
    named = f"RAY_ADDRESS={env}" if env and address == "auto" else f"ray.address={address}"
    text = f"{exc}" + (f": {exc.__cause__}" if exc.__cause__ else "")
    if "AuthenticationError" in text or "InvalidAuthToken" in text:
        mode = os.environ.get(AUTH_MODE)
        token = ("the cluster's token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token on the "
                 "cluster's head)")
        if mode is not None:
            fix = (f"run with {AUTH_MODE} unset or token and the cluster's token "
                   "(RAY_AUTH_TOKEN or ~/.ray/auth_token)")
        elif address == "auto":
            fix = f"give this driver {token}"
        else:  # (Ray sends no token to an address given unless told)
            fix = (f"set {AUTH_MODE}=token and give this driver {token}: Ray sends a token "
                   "only to a cluster it finds itself (ray.address=auto)")
        return (f"{named}: the Ray cluster refused this driver's authentication "
                f"({AUTH_MODE}={mode or 'unset'}; a cluster `ray start` started asks for the "
                f"token it wrote to ~/.ray/auth_token); {fix}, or start the cluster with "
                f"{AUTH_MODE}=disabled")
    head, _, stack = text.partition("Traceback (most recent call last):")
    last = [line.strip() for line in stack.splitlines() if line.strip()][-1:]
    why = " ".join(" ".join([head, *last]).split()).rstrip(":") or type(exc).__name__
    return (f"{named}: could not connect to a Ray cluster from this machine ({why}); start "
            "one (`ray start --head`) or submit the job to a running one (`ray job submit`), "
            "or leave ray.address (and RAY_ADDRESS) unset to run on an embedded local Ray")


@contextlib.contextmanager
def _started_with(env: dict[str, str]) -> Iterator[None]:
    """`env` in this process's environment while the embedded Ray starts: its raylet, and
    the worker processes the raylet starts, inherit it (the workers' memory settings,
    `memory.worker_env`); the driver's own environment is restored afterwards. A
    Ray runtime environment would do the same at a cost: its workers are not the ones the
    raylet starts ahead (the likely cause), and the demo build's scan began 3-5 s later with
    one."""
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
