"""Flower's simulation on this machine, and the processes it leaves: the Ray set-up (one CPU per
client, workers at normal priority, token authentication), the ServerApp and ClientApp run with
`run_simulation`, and on Ctrl-C the run's stop event set, Ray shut down and its processes killed; a
watchdog (reaper.py) ends them when this process is killed outright."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading

log = logging.getLogger(__name__)


def run_simulation(clients: int, overrides: dict, verbose: bool, stop: threading.Event) -> None:
    """The ServerApp and ClientApp of `overrides` in Flower's simulation, one CPU per client; an
    interruption sets `stop` (the ServerApp's waits end) and shuts Ray down."""
    from flwr.simulation import run_simulation as flower_simulation

    from .client_app import build_client_app
    from .server_app import build_server_app

    cpus = os.cpu_count() or 1
    # A client process that dies (a device vanishing) is restarted by ray, and a job handed to it while it
    # restarts is retried once: Flower puts the dead actor back in its pool, which failed other clients too.
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0, "max_restarts": -1, "max_task_retries": 1},
               "init_args": {"num_cpus": cpus, "include_dashboard": False,
                             "logging_level": "info" if verbose else "error", "log_to_driver": verbose}}
    _quiet_flower(verbose)
    with ray_environment(), _ray_notes_shown(verbose), watchdog():
        try:
            flower_simulation(build_server_app(overrides, simulation=True, stop=stop), build_client_app(overrides),
                              num_supernodes=clients, backend_config=backend, verbose_logging=verbose)
        except KeyboardInterrupt:
            stop.set()              # the ServerApp thread stops waiting for replies
            shutdown_ray()
            raise


@contextlib.contextmanager
def watchdog():
    """reaper.py watching this process for the run: if it is killed outright, the processes it
    started (Ray's services, agents and workers) are ended too; told `done` when the run ends here."""
    import subprocess
    import sys
    from pathlib import Path

    from .reaper import DONE

    proc = subprocess.Popen([sys.executable, "-I", "-S", str(Path(__file__).with_name("reaper.py")), str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.write(DONE)
            proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


@contextlib.contextmanager
def _ray_notes_shown(verbose: bool):
    """Ray's driver prints its services' notes ("(raylet) Task ClientAppActor.terminate failed ...",
    in colour) whatever its log settings; they say nothing a user can act on, so only --debug shows
    them. Ray has no public switch: the flag its printer reads is set for the run and restored."""
    import ray._private.worker as ray_worker

    saved = getattr(ray_worker, "_worker_logs_enabled", True)
    ray_worker._worker_logs_enabled = verbose
    try:
        yield
    finally:
        ray_worker._worker_logs_enabled = saved


@contextlib.contextmanager
def ray_environment():
    """The environment Ray's processes inherit, for the simulation only (restored after): Ray reads
    these when it starts its services and workers, and has no other way to be told."""
    saved = {k: os.environ.get(k) for k in simulation_env()}
    os.environ.update(simulation_env())
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def simulation_env() -> dict[str, str]:
    """The environment Ray's processes get: ClientApp actors at normal priority (Ray's default
    nice 15 starves them on a busy machine), and token authentication on every Ray service
    (Ray 2.55 binds its gRPC ports on all interfaces; the random token exists only in this
    process's environment and its children's). A user's own RAY_AUTH_MODE is kept."""
    env = {"RAY_worker_niceness": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    if "RAY_AUTH_MODE" not in os.environ or os.environ.get("RAY_AUTH_TOKEN") == _ray_token():
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_ray_token())
    return env


@functools.lru_cache(maxsize=1)
def _ray_token() -> str:
    """One random token per process: Ray's driver caches the token it first read."""
    import secrets

    return secrets.token_hex(32)


def shutdown_ray() -> None:
    """Stop Ray (its GCS, raylet and ClientApp workers) if this process started it."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - best effort while interrupted
            pass


def kill_children(grace: float = 3.0) -> None:
    """Terminate this process's remaining child processes (Ray's GCS, raylet, workers), then kill
    what is left after `grace` seconds."""
    import signal
    import time

    from .reaper import descendants

    pids = descendants(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            pids = [p for p in pids if os.path.exists(f"/proc/{p}") and not _zombie(p)]
            if not pids:
                return
            time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _quiet_flower(verbose: bool) -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)  # its round-by-round INFO and a deprecation notice
