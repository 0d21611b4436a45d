"""Ctrl-C and SIGTERM in `prep run` (pipeline/interrupts.py): a real signal to the running
process group (as a terminal sends it), then: exit 130 (143 for SIGTERM), at most a few lines
after the signal, the last one saying how to resume; no process left behind; and the rerun of
the same command resumes to an output byte-identical to an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_same_output

from prep.pipeline.interrupts import MESSAGE, descendants

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bigger_demo(tmp_path_factory, tiny_cache, tiny):
    """Enough images (240) that the run is still working when the signal comes."""
    from prep.demo import write_demo_data

    root = tmp_path_factory.mktemp("interrupt-demo")
    demo = write_demo_data(str(root), identities=30, images_per_identity=8, general_shards=2, general_per_shard=8,
                           seed=2, corrupt=1)
    return demo


def command(demo: dict, out: Path, tiny_cache: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prep.cli", "run", "--input", f"celeba:{demo['celeba_dir']}",
            "--input", f"wds:{demo['general_pattern']}", "--preset", "tiny", "--model-cache", tiny_cache,
            "--out", str(out), "--samples-per-shard", "20", *extra]


def run_and_signal(cmd: list[str], signum: int, when: re.Pattern) -> tuple[int, list[str], list[str]]:
    """Starts cmd in a new process group, sends `signum` to the group once a stderr line
    matches `when`; returns (exit code, lines before the signal, lines after it)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    before, after, sent = [], [], threading.Event()

    def read():
        for line in proc.stdout:
            (after if sent.is_set() else before).append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any(when.search(line) for line in before):
        assert proc.poll() is None, "the run ended before the signal:\n" + "\n".join(before[-20:])
        assert time.monotonic() < deadline, "no line matched " + when.pattern
        time.sleep(0.05)
    tree = descendants(proc.pid)
    sent.set()
    os.killpg(proc.pid, signum)
    code = proc.wait(timeout=120)
    reader.join(timeout=30)
    time.sleep(0.5)
    left = [pid for pid in [proc.pid, *tree] if os.path.exists(f"/proc/{pid}") and _alive(pid)]
    assert left == [], f"processes left running after the interrupt: {left}"
    return code, before, after


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def reference(bigger_demo, tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("interrupt-ref") / "out"
    proc = subprocess.run(command(bigger_demo, out, tiny_cache, "--no-progress"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("mode, signum, extra", [
    ("single job", signal.SIGINT, ()),
    ("single job, 2 workers", signal.SIGINT, ("--workers", "2")),
    ("chunked, 2 workers", signal.SIGINT, ("--chunk-inputs", "60", "--workers", "2")),
    ("chunked, 2 workers, SIGTERM", signal.SIGTERM, ("--chunk-inputs", "60", "--workers", "2")),
])
def test_a_signal_stops_the_run_in_one_line_and_the_rerun_resumes(bigger_demo, tiny_cache, tmp_path, reference,
                                                                 mode, signum, extra):
    out = tmp_path / "out"
    cmd = command(bigger_demo, out, tiny_cache, *extra)
    # A model has loaded: the pipeline is running its stages.
    code, before, after = run_and_signal(cmd, signum, re.compile(r"loaded in [0-9.]+ s"))
    assert code == 128 + signum, (code, after)
    assert after and after[-1] == MESSAGE, after
    assert len(after) <= 3, after
    assert not (out / "manifest.json").exists()  # not mistaken for a complete run
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"^\[prep +[0-9.]+s\] resuming ", rerun.stderr, flags=re.M), rerun.stderr[:2000]
    assert "WARNING" not in rerun.stderr
    assert_same_output(str(reference), str(out))


def test_a_partial_run_of_other_settings_is_refused_naming_them(bigger_demo, tiny_cache, tmp_path):
    out = tmp_path / "out"
    code, _, after = run_and_signal(command(bigger_demo, out, tiny_cache, "--seed", "1"), signal.SIGINT,
                                    re.compile(r"loaded in [0-9.]+ s"))
    assert code == 130, after
    other = subprocess.run(command(bigger_demo, out, tiny_cache, "--seed", "2", "--refs-per-sample", "3"),
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 2
    assert "holds a partial run that differs: --refs-per-sample 4 -> 3, --seed 1 -> 2" in other.stderr, other.stderr


def test_a_block_that_ends_normally_gives_the_handlers_back():
    from prep.pipeline.interrupts import interruptible

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with interruptible():
        assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
    assert {s: signal.getsignal(s) for s in before} == before


def test_descendants_finds_children_and_grandchildren():
    child = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(descendants(child.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(descendants(child.pid)) == 1  # the sleep, child of the shell
        assert child.pid in descendants(os.getpid())
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def test_a_second_signal_after_the_first_is_ignored_and_main_exits_with_the_code():
    """Once stopping, a second Ctrl-C (pressed twice, or a supervisor's SIGTERM after SIGINT)
    must neither raise in the code that unwinds nor change the exit code. Before the fix this
    exited -2 (killed by SIGINT), as one CI run did under load."""
    script = """
import os, signal, time
import prep.cli as cli
from prep.pipeline.interrupts import interruptible

def app(**kwargs):
    try:
        with interruptible():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:  # Interrupted is on its way to main(): two more signals
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)

cli.app = app
cli.main([])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines() == [MESSAGE], proc.stderr
