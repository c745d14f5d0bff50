"""`ray`: each task of the run a Ray task on a cluster (the optional extra: `pip install 'tbpw[ray]'`).

Where: `address: auto` joins the cluster this machine belongs to (`ray start` ran here), `host:6379` or
`ray://host:10001` a given one; no address starts a local cluster on this machine. The run directory and
tbpw's caches must sit on storage every node mounts at the same path: a task gets paths and returns paths
and numbers, never file contents, so nothing big goes through Ray's object store. Every task first checks
that its node has the driver's llama.cpp build (outputs differ across builds) and sees the run directory,
and refuses with one line otherwise.

Resources: a task takes `cpus_per_task` CPUs (its tools' thread count), one GPU (`gpus_per_task`) when
its tools offload to a GPU, its declared memory, and a whole node when it needs the machine to itself
(llama-bench). A task whose worker dies (a crash, a node lost, a kill) is retried up to `max_retries`
times; its half-written stage is a hidden partial folder that the retry discards. Ctrl-C cancels the
tasks; the finished stages stay and the next run resumes from them.

Joining: a cluster at `address` that cannot be reached stops the run with one line within `connect_timeout_s`
(Ray alone would retry for many minutes, printing only its own warnings): a plain TCP connect to the address,
bounded by that time, then `ray.init` with Ray's GCS connect timeout and retries cut down to what is left of it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import Field

from tbpw import Executor, Job, JobEvent, PluginOptions, TbpwError, ToolSlot

CANCEL_GRACE_SECONDS = 5.0
# Ray's own knobs for joining a cluster (Ray 2.x): the C++ GCS client's timeouts, read from the environment when
# its config is (re)initialized, and how many times the driver's Python side tries again (1 s apart; default 20).
RAY_GCS_CONNECT_TIMEOUT = "RAY_py_gcs_connect_timeout_s"  # each wait for the cluster's ID (default 30 s)
RAY_GCS_CHANNEL_TIMEOUT = "RAY_gcs_rpc_server_connect_timeout_s"  # each wait for a gRPC channel, two per try (5 s)
RAY_GCS_TRIES = "RAY_gcs_server_port_wait_time_s"


class RayOptions(PluginOptions):
    address: str | None = Field(None, description="'auto', host:port or ray://host:port; none: start a local cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (default: this machine's)")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local cluster (default: the visible ones)")
    object_store_mib: int = Field(128, ge=80, description="object store of a local cluster (tbpw sends only "
                                                          "paths and numbers through it)")
    cpus_per_task: int = Field(1, ge=1, description="CPUs each task takes: its tools' thread count")
    gpus_per_task: float = Field(1.0, gt=0, description="GPUs a task that offloads takes")
    max_retries: int = Field(3, ge=0, description="times a task whose worker died is run again")
    runtime_env: dict[str, Any] | None = Field(None, description="Ray runtime_env of every task (env_vars, ...)")
    log_to_driver: bool = Field(False, description="show the workers' own output in the driver")
    connect_timeout_s: int = Field(30, ge=5, description="seconds to join the cluster at `address` before the run "
                                                         "stops with one line")


def run_job(job: Job, threads: int | None) -> tuple[Any, list[str]]:
    """A Ray task: run the job on this worker; its log lines come back with its result."""
    lines: list[str] = []
    value = job.execute(lines.append, ToolSlot(threads=threads))  # GPUs: Ray sets CUDA_VISIBLE_DEVICES itself
    return value, lines


class RayCluster(Executor):
    name = "ray"
    description = "a Ray cluster (address: auto, a given one, or a local one); needs the extra tbpw[ray]"
    Options = RayOptions

    def __init__(self, options=None):
        super().__init__(options)
        self._refs: dict[Any, Job] = {}
        self._started: list[JobEvent] = []
        self._owned = False
        self._remote: Any = None
        self._node_cpus = 1.0
        self._node_memory = 0.0
        self._log: Callable[[str], None] = print

    def describe(self) -> str:
        where = self.options.address or "a local cluster"
        return f"ray on {where}, {self._node_cpus:g} CPUs on the largest node, {self.options.cpus_per_task} per task"

    def check_ready(self) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise TbpwError("the ray executor needs Ray: pip install 'tbpw[ray]' (on the driver and every node)") from None

    def open(self, log: Callable[[str], None]) -> None:
        self.check_ready()
        import ray

        self._log = log
        if not ray.is_initialized():
            opts = self.options
            if opts.address:
                self._join(opts.address)
            else:
                ray.init(num_cpus=opts.num_cpus, num_gpus=opts.num_gpus, include_dashboard=False,
                         object_store_memory=opts.object_store_mib * 2**20, log_to_driver=opts.log_to_driver)
            self._owned = True
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self._node_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=1.0) or 1.0
        self._node_memory = max((n["Resources"].get("memory", 0.0) for n in nodes), default=0.0)
        self._remote = ray.remote(run_job)

    def _join(self, address: str) -> None:
        """ray.init on the cluster at `address`, or one line within connect_timeout_s saying it cannot be reached."""
        import ray

        limit = self.options.connect_timeout_s
        start = time.monotonic()
        target = _host_port(address)  # None: `auto` found no cluster here, and ray.init says so at once
        if target is not None:
            if reason := _tcp_unreachable(*target, timeout=limit):
                raise TbpwError(_cannot_reach(_show(target), limit, reason))
        try:
            with _bounded_ray_connect(max(1, int(limit - (time.monotonic() - start)))):
                ray.init(address=address, log_to_driver=self.options.log_to_driver)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if target is None:
                raise TbpwError(f"executor ray: could not connect to the Ray cluster at {address} ({_one_line(exc)}): "
                                "start it with `ray start --head` or fix executor.options.address") from None
            raise TbpwError(_cannot_reach(_show(target), limit, "TCP connects, but Ray did not join a GCS there, see "
                                          f"Ray's warnings above: {_one_line(exc)}")) from None

    def submit(self, job: Job) -> None:
        opts = self.options
        cpus = self._node_cpus if job.resources.exclusive else min(float(opts.cpus_per_task), self._node_cpus)
        options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": opts.gpus_per_task if job.resources.gpu else 0,
                                   "max_retries": opts.max_retries, "retry_exceptions": False, "name": job.name}
        if job.resources.memory and self._node_memory:
            options["memory"] = min(float(job.resources.memory), self._node_memory)
        if opts.runtime_env:
            options["runtime_env"] = opts.runtime_env
        ref = self._remote.options(**options).remote(job, int(cpus))
        self._refs[ref] = job
        self._started.append(JobEvent(job.name, "started"))  # handed to the cluster, which starts it when it has room

    def poll(self, timeout: float) -> list[JobEvent]:
        import ray

        events, self._started = self._started, []
        if not self._refs:
            return events
        # every task that is done by the timeout (waiting for all of them, so a batch comes back together)
        ready, _ = ray.wait(list(self._refs), num_returns=len(self._refs), timeout=0 if events else timeout)
        for ref in ready:
            job = self._refs.pop(ref)
            try:
                value, lines = ray.get(ref)
                events.append(JobEvent(job.name, "done", value, log=tuple(lines)))
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                events.append(JobEvent(job.name, "failed", error=cause))
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.TaskUnschedulableError) as exc:
                events.append(JobEvent(job.name, "failed", error=TbpwError(
                    f"{job.name}: its Ray worker died {self.options.max_retries + 1} times ({type(exc).__name__}): "
                    "see the Ray logs of the nodes; the finished stages are kept, run again to resume")))
        return events

    def cancel(self) -> None:
        """Interrupt the running tasks (their tools are stopped with them), then kill what is left."""
        import ray

        refs = list(self._refs)
        for ref in refs:
            ray.cancel(ref, force=False)
        deadline = time.monotonic() + CANCEL_GRACE_SECONDS
        while refs and time.monotonic() < deadline:
            _, refs = ray.wait(refs, num_returns=len(refs), timeout=0.5)
        for ref in refs:
            try:
                ray.cancel(ref, force=True)
            except (ValueError, TypeError):
                pass
        self._refs.clear()

    def close(self) -> None:
        import ray

        if self._owned and ray.is_initialized():
            ray.shutdown()
        self._owned = False


def _cannot_reach(where: str, limit: int, reason: str) -> str:
    return (f"executor ray: cannot reach the Ray cluster at {where} within {limit} s ({reason}): start it with "
            "`ray start --head` or fix executor.options.address")


def _one_line(exc: BaseException) -> str:
    """The last line of an error's text (Ray's may carry a whole traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _show(target: tuple[str, int]) -> str:
    host, port = target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) that `address` names: `auto` as Ray resolves it (RAY_ADDRESS, the last `ray start` here;
    None when it finds none), `host:port` and `ray://host:port` as written."""
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            address = canonicalize_bootstrap_address(address) or ""
        except Exception:  # Ray's private helper: without it, ray.init resolves `auto` itself
            return None
        if not address:
            return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TbpwError(f"executor ray: executor.options.address {address!r} is not `auto`, host:port or "
                        "ray://host:port")
    return host, int(port)


def _tcp_unreachable(host: str, port: int, timeout: float) -> str | None:
    """Why a TCP connection to host:port cannot be made within `timeout` seconds; None when it can."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return "TCP connect: timed out"
    except OSError as exc:
        return f"TCP connect: {exc.strerror or exc}"


@contextmanager
def _bounded_ray_connect(seconds: int) -> Iterator[None]:
    """While inside, ray.init on an address makes one try of about `seconds` (at least 4) to reach the GCS, not
    Ray's 20 tries of 41 s. Ray reads its GCS timeouts from the environment whenever its config is initialized
    (here, by ray.init itself when it turns on token authentication, and by the core worker on joining) and the
    number of tries when ray.init runs: the environment holds them until ray.init returns, then is put back. A
    joined driver keeps the shorter timeouts, which only bound making a new connection to a GCS that answers."""
    try:
        import ray._raylet
    except ImportError:
        ray_config = None
    else:
        ray_config = getattr(ray._raylet, "Config", None)
    if ray_config is None or not hasattr(ray_config, "initialize"):  # another Ray: the TCP connect was the bound
        yield
        return
    channel = max(1, seconds // 6)  # two channel waits (GCS and its pubsub), the wait for the ID, a 1 s pause
    bounds = {RAY_GCS_CHANNEL_TIMEOUT: str(channel), RAY_GCS_CONNECT_TIMEOUT: str(max(1, seconds - 2 * channel - 2)),
              RAY_GCS_TRIES: "1"}
    saved = {name: os.environ.get(name) for name in bounds}
    os.environ.update(bounds)
    try:
        ray_config.initialize("")  # re-reads every RAY_* setting from the environment
        yield
    except BaseException:
        _restore(saved)
        ray_config.initialize("")  # not joined: Ray's usual timeouts again for whatever this process does next
        raise
    finally:
        _restore(saved)


def _restore(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
