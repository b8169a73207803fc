"""Fault injection: runs are stopped, killed, damaged and starved of disk as a scheduler, an operator or a
failing machine would, and nothing trained is lost.

Each case starts real processes (``python -m mmpost`` or torchrun) on a tiny model; a resumed run must give
the loss curve of an uninterrupted one, exactly on CPU.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import torchrun, write_run_config

from mmpost.cli import main
from mmpost.training.checkpoint import step_checkpoints
from mmpost.training.metrics import read_metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEPS = 40


def curve(run: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run) if "loss" in r]


def last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines[:-1] if line]  # the last line may be half written
    return max(steps, default=0)


def mmpost(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmpost", *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def start(*args: str) -> subprocess.Popen:
    """A training process in its own process group, as a shell starts a foreground job."""
    return subprocess.Popen(
        [sys.executable, "-m", "mmpost", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120, every: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(every)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth_dir, llm_dir, clip_dir):
    """Writes configs of one tiny align run (each under its own ``out``) and runs it once uninterrupted."""
    folder = tmp_path_factory.mktemp("faults")

    def config(name: str, **train) -> Path:
        return write_run_config(
            folder,
            synth_dir,
            llm_dir,
            clip_dir,
            name,
            data={"eval": None, "num_workers": 1},
            train={"max_steps": STEPS, "warmup_ratio": 0.1, **train},
        )

    straight = config("straight")
    result = mmpost("train", str(straight))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, config, curve(folder / "straight")


def test_sigint_to_the_process_group_at_a_random_step_checkpoints_and_resumes_the_same_curve(runs):
    folder, config, straight = runs
    cfg = config("interrupted")  # save_every 0: without the signal checkpoint everything would be lost
    at = random.Random().randint(3, 15)
    proc = start("train", str(cfg))
    wait_for(lambda: last_step(folder / "interrupted") >= at, proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the main process and its data worker receive it
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    (step, checkpoint), *_ = [(s, p) for s, p in step_checkpoints(folder / "interrupted")]
    assert at <= step < STEPS, (at, step)
    assert f"checkpoint written to {checkpoint}" in err and "--resume" in err
    assert not (folder / "interrupted" / "final").exists()
    result = mmpost("train", str(cfg), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert curve(folder / "interrupted") == straight, f"signalled at step {at}"


LONG_STEP = """
import sys, time
from types import SimpleNamespace
from mmpost.training.interrupt import StopOnSignal
with StopOnSignal() as stop:
    print("ready", flush=True)
    time.sleep(float(sys.argv[1]))  # an optimizer step that takes a while
    print("asked", stop.requested(SimpleNamespace(num_processes=1)), flush=True)
"""


@pytest.mark.parametrize("signals", [1, 2])
def test_one_signal_waits_for_the_step_and_a_second_aborts_at_once(signals):
    proc = subprocess.Popen([sys.executable, "-c", LONG_STEP, "3"], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    started = time.monotonic()
    for _ in range(signals):
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.2)  # two signals sent together arrive as one
    out, _ = proc.communicate(timeout=30)
    if signals == 1:  # the step ran to its end and the loop was told
        assert proc.returncode == 0 and out.strip() == f"asked {int(signal.SIGTERM)}"
        assert time.monotonic() - started > 2.5
    else:  # killed by the signal's default action, without waiting for the step
        assert proc.returncode == -signal.SIGTERM and out == ""
        assert time.monotonic() - started < 2.0


def test_kill_9_during_a_checkpoint_write_then_resume_gives_the_same_curve(runs):
    folder, config, straight = runs
    cfg = config("killed", save_every=2, keep_checkpoints=2)
    proc = start("train", str(cfg))
    checkpoints = folder / "killed" / "checkpoints"
    # the third save is the one to interrupt: two complete checkpoints exist by then
    wait_for(lambda: (checkpoints / "step-6.tmp").exists() or (checkpoints / "step-6").exists(), proc, every=0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert [s for s, _ in step_checkpoints(folder / "killed")][-1] in (4, 6)
    result = mmpost("train", str(cfg), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(p.name.endswith((".tmp", ".old")) for p in checkpoints.iterdir())
    assert curve(folder / "killed") == straight


def test_flipped_bytes_in_a_checkpoint_are_found_and_named(run_config, tmp_path, capsys):
    cfg = run_config("flipped", train={"max_steps": 4, "save_every": 2})
    assert main(["train", str(cfg)]) == 0
    weights = tmp_path / "flipped" / "checkpoints" / "step-2" / "model" / "parts.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])
    weights.write_bytes(bytes(data))
    assert main(["train", str(cfg), "--resume"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("mmpost: error:")]
    assert f"{weights} is damaged" in line


def test_a_torn_last_metrics_line_is_dropped_on_resume(run_config, tmp_path):
    straight = run_config("whole", train={"max_steps": 6})
    assert main(["train", str(straight)]) == 0
    cfg = run_config("torn", train={"max_steps": 6, "save_every": 3})
    assert main(["train", str(cfg)]) == 0
    with (tmp_path / "torn" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 2.3')  # the disk filled up, or the process died, mid-line
    assert main(["train", str(cfg), "--resume"]) == 0
    assert curve(tmp_path / "torn") == curve(tmp_path / "whole")


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (a tiny checkpoint takes ~0.7 MiB); needs the right to mount, and is skipped without it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip() or 'mount failed'}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_earlier_ones(run_config, small_disk, tmp_path, capsys):
    cfg = run_config(
        "full", out=str(small_disk / "run"), train={"max_steps": 40, "save_every": 2, "keep_checkpoints": 0}
    )
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "no space left on device for checkpoint step-" in err and "it needs ~" in err
    checkpoints = step_checkpoints(small_disk / "run")
    assert checkpoints, "the disk should hold at least one checkpoint"
    assert not any(p.name.endswith(".tmp") for p in (small_disk / "run" / "checkpoints").iterdir())
    from mmpost.training.checkpoint import verify_checkpoint

    for _, path in checkpoints:
        verify_checkpoint(path)  # intact


def start_torchrun(*args: str, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        torchrun(*args, port=port),
        env={**ENV, "ACCELERATE_USE_CPU": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_processes_with_dropped_micro_batches_finish_survive_sigterm_and_match_one(
    tmp_path, synth_dir, llm_dir, clip_dir
):
    # every odd sample is a corrupt image: whole micro-batches of one process go missing while the other's remain
    records = json.loads((synth_dir / "align.json").read_text())[:48]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    for i, record in enumerate(records):
        if i % 2:
            record["image"] = str(tmp_path / "broken.png")
    (tmp_path / "half.json").write_text(json.dumps(records))
    data = {
        "train": {"path": str(tmp_path / "half.json"), "image_root": str(synth_dir / "images")},
        "eval": None,
        "max_bad_fraction": 0.9,
    }
    common = {"max_steps": 12, "log_every": 1, "warmup_ratio": 0.0}
    one = write_run_config(tmp_path, synth_dir, llm_dir, clip_dir, "one", data=data, train={**common, "batch_size": 2})
    two = write_run_config(tmp_path, synth_dir, llm_dir, clip_dir, "two", data=data, train={**common, "batch_size": 1})
    single = mmpost("train", str(one))
    assert single.returncode == 0, single.stderr[-3000:]
    proc = start_torchrun("train", str(two), port=29541)
    wait_for(lambda: last_step(tmp_path / "two") >= 4, proc, timeout=180)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which forwards it to both workers
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and "checkpoint written to" in err, err[-3000:]
    resumed = start_torchrun("train", str(two), "--resume", port=29542)
    _, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err[-3000:]
    one_curve, two_curve = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert [s for s, _, _ in two_curve] == list(range(1, 13))
    skipped = [r["data/skipped"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert skipped[-1] > 0
    for (_, a, _), (_, b, _) in zip(one_curve, two_curve, strict=True):
        # None: a step in which every sample was dropped (no update)
        assert (a is None and b is None) or abs(a - b) <= 1e-4 * abs(a), (one_curve, two_curve)
