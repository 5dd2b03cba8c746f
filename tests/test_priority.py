"""station.priority: per-thread nice values and the models' real-time policy."""

from __future__ import annotations

import os
import threading

import cv2
import numpy as np
import pytest

from station.config import TuningConfig
from station.priority import (
    MAX_NICE,
    ThreadPolicy,
    adopt_opencv_pool,
    infer_policy_this_thread,
    lower_this_thread,
    nice_this_thread,
    realtime_this_thread,
    split_cpus,
)


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _in_thread(fn):
    out = {}

    def run():
        out["value"] = fn()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out["value"]


def test_lowering_applies_to_the_calling_thread_and_its_children_only():
    base = thread_nice()

    def body():
        lowered = lower_this_thread(3)
        child = _in_thread(thread_nice)  # a thread started from here inherits the value
        return lowered, thread_nice(), child

    lowered, own, child = _in_thread(body)
    assert lowered == own == child == min(MAX_NICE, base + 3)
    assert thread_nice() == base  # the process and the other threads keep theirs
    assert os.getpriority(os.PRIO_PROCESS, 0) == base


def test_zero_changes_nothing_and_the_value_is_capped():
    base = thread_nice()
    assert _in_thread(lambda: (lower_this_thread(0), thread_nice())) == (None, base)
    assert _in_thread(lambda: (lower_this_thread(100), thread_nice())) == (MAX_NICE, MAX_NICE)


def _os_threads() -> dict[int, int]:
    """tid → nice of every OS thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = os.getpriority(os.PRIO_PROCESS, int(tid))
        except OSError:  # ended meanwhile
            pass
    return out


@pytest.mark.skipif(cv2.getNumThreads() < 2, reason="OpenCV runs without worker threads here")
def test_opencv_workers_are_re_created_at_the_lowered_priority():
    base = thread_nice()
    image = np.random.default_rng(0).integers(0, 255, (1024, 1024), np.uint8)
    clahe = cv2.createCLAHE(2.0, (8, 8))
    clahe.apply(image)  # the pool exists, started from this thread
    before = _os_threads()

    def body():
        lower_this_thread(4)
        adopt_opencv_pool()
        clahe.apply(image)
        return threading.get_native_id(), _os_threads()

    me, after = _in_thread(body)
    new = {tid: nice for tid, nice in after.items() if tid not in before and tid != me}
    assert new and set(new.values()) == {min(MAX_NICE, base + 4)}
    assert cv2.getNumThreads() >= 2  # the pool keeps its size


def _fifo_refused() -> str | None:
    """Why this process cannot put a thread under SCHED_FIFO, or None when it can."""
    def probe():
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except (AttributeError, OSError) as exc:
            return f"SCHED_FIFO refused here ({exc}): no CAP_SYS_NICE and no RLIMIT_RTPRIO"
        return None

    return _in_thread(probe)


FIFO_REFUSED = _fifo_refused()  # also read by test_daemon and test_bench


@pytest.mark.skipif(FIFO_REFUSED is not None, reason=str(FIFO_REFUSED))
def test_realtime_applies_to_the_calling_thread_only():
    def body():
        ok = realtime_this_thread(7)
        return ok, os.sched_getscheduler(0), os.sched_getparam(0).sched_priority

    assert _in_thread(body) == (True, os.SCHED_FIFO, 7)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # this thread and the process keep theirs


def test_realtime_zero_changes_nothing():
    assert _in_thread(lambda: (realtime_this_thread(0), os.sched_getscheduler(0))) == (False, os.SCHED_OTHER)


def test_a_refused_realtime_policy_is_logged_and_the_thread_goes_on(monkeypatch, caplog):
    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    assert _in_thread(lambda: (realtime_this_thread(5), os.sched_getscheduler(0))) == (False, os.SCHED_OTHER)
    assert "tuning.realtime_inference 5 refused: [Errno 1] Operation not permitted" in caplog.text


def _negative_nice_refused() -> str | None:
    """Why a thread here may not raise its priority (nice below the process's), or None."""
    def probe():
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), thread_nice() - 1)
        except OSError as exc:
            return f"a nice value below the process's is refused here ({exc}): no CAP_SYS_NICE, RLIMIT_NICE"
        return None

    return _in_thread(probe)


NICE_REFUSED = _negative_nice_refused()  # also read by test_daemon


@pytest.mark.skipif(NICE_REFUSED is not None, reason=str(NICE_REFUSED))
def test_nice_this_thread_sets_the_calling_threads_value_only():
    """tuning.infer_nice: the infer thread's nice value, set (not added), below the process's too;
    the policy stays the ordinary one and the other threads keep theirs."""
    base = thread_nice()
    target = max(-20, base - 7)

    def body():
        ok = nice_this_thread(target)
        return ok, thread_nice(), os.sched_getscheduler(0)

    assert _in_thread(body) == (True, target, os.SCHED_OTHER)
    assert thread_nice() == base


def test_a_refused_nice_value_is_logged_and_the_thread_goes_on(monkeypatch, caplog):
    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    base = thread_nice()
    monkeypatch.setattr(os, "setpriority", refuse)
    assert _in_thread(lambda: (nice_this_thread(-20), thread_nice())) == (False, base)
    assert "keeps its nice value (tuning.infer_nice -20 refused: [Errno 13] Permission denied)" in caplog.text


@pytest.mark.skipif(FIFO_REFUSED is not None, reason=str(FIFO_REFUSED))
@pytest.mark.skipif(NICE_REFUSED is not None, reason=str(NICE_REFUSED))
def test_the_infer_threads_policy_is_its_nice_value_when_set_else_fifo():
    """One choice for the daemon's infer thread and the bench's bare runs: tuning.infer_nice wins
    over tuning.realtime_inference; neither asked, the thread is left as it is."""
    base = thread_nice()

    def taken(realtime, nice):
        return _in_thread(lambda: (infer_policy_this_thread(realtime, nice), os.sched_getscheduler(0), thread_nice()))

    assert taken(4, base - 2) == ("nice", os.SCHED_OTHER, base - 2)
    assert taken(4, None) == ("fifo", os.SCHED_FIFO, base)
    assert taken(0, None) == (None, os.SCHED_OTHER, base)


def test_the_default_policy_changes_nothing_and_a_tuned_one_carries_the_settings(monkeypatch):
    """tuning off (the default): every thread keeps its creator's priority and CPUs;
    each knob set goes into the policy as it is."""
    assert ThreadPolicy.from_tuning(TuningConfig()) == ThreadPolicy()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    tuned = TuningConfig(nice_non_inference=5, realtime_inference=3, infer_nice=-4, infer_cpu=1)
    assert ThreadPolicy.from_tuning(tuned) == ThreadPolicy(5, 3, -4, ({1}, {0}))


def test_split_cpus_gives_the_infer_thread_one_cpu_and_the_rest_the_others(monkeypatch):
    """tuning.infer_cpu: that CPU for the infer thread, every other allowed one for the rest;
    unset, nothing; a CPU the process may not use, or the only one it may, is refused."""
    from station.errors import ConfigError

    assert split_cpus(None) is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert split_cpus(2) == ({2}, {0, 1, 3})
    with pytest.raises(ConfigError, match=r"tuning.infer_cpu 7: this process may run on CPUs \[0, 1, 2, 3\] only"):
        split_cpus(7)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    with pytest.raises(ConfigError, match="tuning.infer_cpu 1: this process may run on that CPU only"):
        split_cpus(1)
