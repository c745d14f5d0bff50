"""The task graph, the scheduler and the `local` executor on plain Python tasks (no llama.cpp needed):
declared dependencies, results passed on, tasks at once when there are workers, the order of one worker,
threads and GPUs per task, exclusive tasks alone, the first failure stopping the rest, Ctrl-C."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tbpw import Resources, TbpwError
from tbpw.jobs import WorkerCheck
from tbpw.llamacpp import resources
from tbpw.run.execute import RunInterrupted, execute
from tbpw.run.graph import Ref, TaskGraph, resolve
from tbpw_plugins.executors.local import Local, LocalOptions


class Record:
    """Task bodies (module level, so they pickle) that note what ran when, with which slot."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, float]] = []
        self.slots: dict[str, tuple[int | None, dict[str, str], str]] = {}

    def note(self, name: str, what: str) -> None:
        with self.lock:
            self.events.append((name, what, time.monotonic()))

    def overlapped(self, a: str, b: str) -> bool:
        span = {n: [t for m, _, t in self.events if m == n] for n in (a, b)}
        return span[a][0] < span[b][1] and span[b][0] < span[a][1]


def _task(record: Record, name: str, *inputs, log, seconds: float = 0.0, fail: bool = False):
    record.note(name, "start")
    record.slots[name] = (resources.threads(), resources.environment(), threading.current_thread().name)
    until = time.monotonic() + seconds
    while time.monotonic() < until:  # Python code between short sleeps: an interruption lands within 50 ms
        time.sleep(0.05)
    log(f"ran {name}")
    record.note(name, "end")
    if fail:
        raise TbpwError(f"{name} failed on purpose: nothing to fix")
    return f"{name}({','.join(map(str, inputs))})"


def _call(record: Record, name: str):
    return lambda *inputs, log, **kw: _task(record, name, *inputs, log=log, **kw)


def _diamond(record: Record, seconds: float = 0.0) -> TaskGraph:
    g = TaskGraph()
    a = g.add("a", _call(record, "a"))
    b = g.add("b", _call(record, "b"), a, seconds=seconds)
    c = g.add("c", _call(record, "c"), a, seconds=seconds)
    g.add("d", _call(record, "d"), b, [c, {"x": a}])
    return g


def _local(**options) -> Local:
    return Local(LocalOptions(**options))


def test_refs_are_dependencies_and_are_resolved_anywhere_in_the_arguments():
    g = TaskGraph()
    a = g.add("a", print)
    b = g.add("b", print, a["path"], {"more": [a, (a[0],)]})
    assert g.tasks["b"].deps == ["a"] and b == Ref("b")
    assert resolve(({"more": [a, (Ref("a", 0),)]}, a["path"]), {"a": {"path": 1, 0: 2}}) == (
        {"more": [{"path": 1, 0: 2}, (2,)]}, 1)
    with pytest.raises(TbpwError, match="needs 'zzz', which is not declared before it"):
        g.add("c", print, Ref("zzz"))
    with pytest.raises(TbpwError, match="two tasks are named 'a'"):
        g.add("a", print)


def test_merge_prefixes_names_and_refs():
    inner = TaskGraph()
    a = inner.add("a", print)
    inner.add("b", print, a)
    outer = TaskGraph()
    names = outer.merge(inner, "m1/")
    assert names == {"a": "m1/a", "b": "m1/b"} and outer.tasks["m1/b"].deps == ["m1/a"]


def test_one_worker_runs_in_declaration_order_in_the_calling_thread():
    record, lines = Record(), []
    results = execute(_diamond(record), _local(workers=1), log=lines.append)
    assert results["d"] == "d(b(a()),['c(a())', {'x': 'a()'}])"
    assert [n for n, what, _ in record.events if what == "start"] == ["a", "b", "c", "d"]
    assert {thread for _, _, thread in record.slots.values()} == {threading.current_thread().name}
    assert all(threads is None and env == {} for threads, env, _ in record.slots.values())  # no limits: as before
    assert "ran d" in lines and lines[-1] == "[4/4 done] running: nothing; waiting: 0"


def test_results_flow_along_the_edges():
    record = Record()
    results = execute(_diamond(record), _local(workers=2), log=lambda _: None)
    assert results["b"] == "b(a())" and results["c"] == "c(a())"
    assert results["d"] == "d(b(a()),['c(a())', {'x': 'a()'}])"


def test_two_workers_run_independent_tasks_at_once_with_half_the_threads():
    record, lines = Record(), []
    execute(_diamond(record, seconds=0.5), _local(workers=2), log=lines.append)
    assert record.overlapped("b", "c")
    cores = resources.cpu_count()
    assert record.slots["b"][0] == max(1, cores // 2)
    assert any("running: b, c" in line or "running: c, b" in line for line in lines)
    assert any(line.startswith("[1/4 done]") and "waiting: " in line for line in lines)


def test_an_exclusive_task_runs_alone():
    record = Record()
    g = TaskGraph()
    g.add("slow", _call(record, "slow"), seconds=0.6)
    g.add("bench", _call(record, "bench"), resources=Resources(exclusive=True))
    g.add("other", _call(record, "other"), seconds=0.2)
    execute(g, _local(workers=3, threads=1), log=lambda _: None)
    assert record.overlapped("slow", "other")
    assert not record.overlapped("bench", "slow") and not record.overlapped("bench", "other")
    assert record.slots["bench"][0] == resources.cpu_count()  # the whole machine


def test_each_gpu_task_gets_a_gpu_of_its_own():
    record = Record()
    g = TaskGraph()
    for name in ("g1", "g2"):
        g.add(name, _call(record, name), seconds=0.4, resources=Resources(gpu=True))
    g.add("cpu", _call(record, "cpu"), seconds=0.4)
    execute(g, _local(workers=3, gpus=["0", "1"]), log=lambda _: None)
    seen = {record.slots[n][1][resources.GPU_ENV] for n in ("g1", "g2")}
    assert seen == {"0", "1"} and record.overlapped("g1", "g2")
    assert record.slots["cpu"][1][resources.GPU_ENV] == ""  # CPU work keeps off the GPUs


def test_memory_budget_keeps_big_tasks_apart():
    record = Record()
    g = TaskGraph()
    g.add("big1", _call(record, "big1"), seconds=0.3, resources=Resources(memory=3 * 2**30))
    g.add("big2", _call(record, "big2"), seconds=0.3, resources=Resources(memory=3 * 2**30))
    execute(g, _local(workers=2, memory_gib=4), log=lambda _: None)
    assert not record.overlapped("big1", "big2")


def test_the_first_failure_stops_the_run_and_is_raised_as_it_was():
    record = Record()
    g = TaskGraph()
    g.add("long", _call(record, "long"), seconds=5.0)
    bad = g.add("bad", _call(record, "bad"), seconds=0.1, fail=True)
    g.add("after", _call(record, "after"), bad)
    start = time.monotonic()
    with pytest.raises(TbpwError, match="bad failed on purpose"):
        execute(g, _local(workers=2), log=lambda _: None)
    assert time.monotonic() - start < 4.0  # the long task was interrupted, not waited for
    assert "after" not in record.slots


def test_ctrl_c_stops_the_tasks_and_says_how_to_resume():
    record = Record()
    g = TaskGraph()
    g.add("first", _call(record, "first"))

    def interrupt(*_, log):
        raise KeyboardInterrupt

    g.add("second", interrupt)
    g.add("third", _call(record, "third"))
    with pytest.raises(RunInterrupted, match=r"interrupted: 1 of 3 tasks had finished and are kept; run the same"):
        execute(g, _local(workers=1), log=lambda _: None)
    assert "third" not in record.slots


def test_tool_processes_of_this_process_are_stopped_by_program(tmp_path: Path):
    import shutil
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sleeper = bin_dir / "sleep"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", sleeper)
    mine = subprocess.Popen([str(sleeper), "30"])
    other = subprocess.Popen(["sleep", "30"])
    try:
        assert resources.stop_tool_processes([bin_dir]) == [mine.pid]
        assert mine.wait(timeout=10) != 0 and other.poll() is None
    finally:
        for proc in (mine, other):
            proc.kill()
            proc.wait()


def test_a_worker_refuses_paths_it_cannot_see(tmp_path: Path):
    check = WorkerCheck(None, (tmp_path / "not-mounted-here",))
    with pytest.raises(TbpwError, match=r"^measure: .*not-mounted-here is not visible on .*: put the run directory"):
        check.verify("measure")


def test_default_workers_follow_cores_and_gpus():
    from tbpw_plugins.executors.local import default_workers

    assert [default_workers(cores, 0) for cores in (1, 2, 4, 8, 16, 64)] == [1, 2, 2, 4, 8, 8]
    assert default_workers(64, 12) == 12 and default_workers(2, 1) == 2
    assert _local(workers=1).threads is None and _local(workers=2, threads=3).threads == 3
    assert os.environ.get(resources.GPU_ENV) is None or _local().gpu_ids == resources.visible_gpus()


def test_ctrl_c_cancels_the_ray_tasks(tmp_path: Path):
    """The driver's Ctrl-C interrupts the task running on a Ray worker (a local cluster of 2 CPUs, no dashboard)."""
    pytest.importorskip("ray")
    from tbpw_plugins.executors.ray_cluster import RayCluster, RayOptions

    def slow(folder: str, *, log):
        marker = Path(folder)
        (marker / "started").touch()
        try:
            until = time.monotonic() + 60
            while time.monotonic() < until:
                time.sleep(0.05)
        except KeyboardInterrupt:
            (marker / "interrupted").touch()
            raise
        (marker / "finished").touch()

    class Interrupting(RayCluster):
        def poll(self, timeout):
            if (tmp_path / "started").exists():
                raise KeyboardInterrupt  # what Ctrl-C raises in the driver while it waits
            return super().poll(timeout)

    g = TaskGraph()
    g.add("slow", slow, str(tmp_path))
    start = time.monotonic()
    with pytest.raises(RunInterrupted, match="interrupted: 0 of 1 tasks had finished"):
        execute(g, Interrupting(RayOptions(num_cpus=2)), log=lambda _: None)
    deadline = time.monotonic() + 20
    while not (tmp_path / "interrupted").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "interrupted").exists() and not (tmp_path / "finished").exists()
    assert time.monotonic() - start < 50
