"""Faults: bad carved checkpoints, output-location problems, usage errors, interrupts, kill -9, two writers
of one output, a full disk. Each bad input answers with one line and exit 2 and leaves nothing behind;
an interrupt exits 130 / 143 and says what was kept."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cmoe.io import artifacts
from cmoe.io.artifacts import claimed_output

from conftest import TINYSTORIES_MODEL, TINYSTORIES_TRAIN, TINYSTORIES_VALID, weight_bytes
from test_cli import assert_one_line_error, run, tree

M = str(TINYSTORIES_MODEL)
VALID = str(TINYSTORIES_VALID)
CAL = ["--nsamples", "2", "--seqlen", "64", "--device", "cpu"]


def damaged_copy(carved: Path, into: Path, damage: str) -> Path:
    """A copy of a carved model with one kind of damage."""
    out = into / f"damaged-{damage}"
    shutil.copytree(carved, out)
    config_file, weights = out / "config.json", out / "model-00001-of-00003.safetensors"
    config = json.loads(config_file.read_text())
    first = next(index for index, spec in enumerate(config["cmoe_layers"]) if spec)
    spec = config["cmoe_layers"][first]
    if damage == "experts":
        spec["num_experts"] += 1
    elif damage == "top-k":
        spec["top_k"] = spec["num_experts"] + 1
    elif damage == "width":
        spec["expert_size"] += 1
    elif damage == "shared":
        spec["shared_size"] += 3
    elif damage == "layers":
        config["cmoe_layers"].append(None)
    elif damage == "garbled":
        data = weights.read_bytes()
        weights.write_bytes(data[:20] + b"#garbage#" + data[29:])
    elif damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "no-config":
        config_file.unlink()
    config_file.exists() and config_file.write_text(json.dumps(config))
    return out


DAMAGES = {
    "experts": "num_experts",
    "top-k": "exceeds the",
    "width": "expert_size",
    "shared": "shared_size",
    "layers": "cmoe_layers has",
    "garbled": "not a readable safetensors file",
    "truncated": "not a readable safetensors file",
    "no-weights": "missing (the checkpoint is incomplete)",
    "no-config": "config.json",
}
COMMANDS = {
    "eval perplexity": ["eval", "perplexity", "{model}", "--data", VALID, "--seqlen", "64", "--device", "cpu"],
    "eval routing": ["eval", "routing", "{model}", "--data", f"valid={VALID}", "--seqlen", "64", "-o", "{out}"],
    "export": ["export", "{model}", "--format", "qwen2-moe", "-o", "{out}"],
    "finetune": ["finetune", "{model}", "--data", VALID, "--seqlen", "64", "--device", "cpu", "-o", "{out}"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_carved_model_is_named_in_one_line(capsys, tmp_path, carved_dir, damage, command):
    damaged = damaged_copy(carved_dir, tmp_path, damage)
    before = tree(tmp_path)
    args = [arg.format(model=damaged, out=tmp_path / "out") for arg in COMMANDS[command]]
    assert_one_line_error(capsys, args, DAMAGES[damage])
    assert tree(tmp_path) == before


USAGE = [
    (["carve", M, "--bogus"], "No such option: --bogus"),
    (["profile", M, "--bogus"], "No such option: --bogus"),
    (["export", M, "--bogus"], "No such option: --bogus"),
    (["finetune", M, "--bogus"], "No such option: --bogus"),
    (["eval", "perplexity", M, "--bogus"], "No such option: --bogus"),
    (["eval", "routing", M, "--bogus"], "No such option: --bogus"),
    (["carve", M], "Missing option '--output'"),
    (["profile", M], "Missing option '--output'"),
    (["carve", M, "-o", "{out}", "--nsamples", "many"], "Invalid value for '--nsamples'"),
    (["carve", M, "-o", "{out}", "--seed", "1.5"], "Invalid value for '--seed'"),
    (["finetune", M, "-o", "{out}", "--lr", "fast"], "Invalid value for '--lr'"),
    (["shape-shift"], "No such command 'shape-shift'"),
    (["eval", "speed"], "No such command 'speed'"),
    (["export"], "Missing argument"),
    (["carve", M, "-o"], "requires an argument"),
]


@pytest.mark.parametrize("args,expected", USAGE)
def test_usage_errors_exit_2_with_the_usage_line(capsys, tmp_path, args, expected):
    before = tree(tmp_path)
    args = [arg.format(out=tmp_path / "out") for arg in args]
    code, _, err = run(capsys, *args)
    assert code == 2 and "rerun with --debug" not in err, err
    assert_one_line_error(capsys, args, expected)
    assert tree(tmp_path) == before


def outputs(tmp_path: Path) -> list:
    """Cases about the output location and the inputs' sizes, checked before any heavy work."""
    return [
        (
            [
                "carve",
                M,
                "-o",
                str(tmp_path / "missing" / "deeper" / "out"),
                "--data",
                str(tmp_path / "nope.txt"),
                *CAL,
            ],
            "nope.txt",
        ),
        (["carve", M, "-o", str(tmp_path / "file.txt" / "out"), "--data", VALID, *CAL], "cannot create the output's"),
        (
            ["carve", M, "-o", str(tmp_path / "out"), "--data", VALID, "--nsamples", "100000000", "--seqlen", "64"],
            "more than the calibration text's",
        ),
        (
            ["profile", M, "-o", str(tmp_path / "out"), "--data", VALID, "--nsamples", "100000", "--seqlen", "512"],
            "more than the calibration text's",
        ),
        (["carve", M, "-o", str(tmp_path / "out"), "--data", f"{VALID}:abc", *CAL], "no such file"),
        (["finetune", M, "-o", str(tmp_path / "out"), "--data", f"{VALID}:abc"], "mixture weight 'abc'"),
        (["finetune", M, "-o", str(tmp_path / "out"), "--data", f"{VALID}:1:2x"], "mixture weight '2x'"),
        (["export", M, "--format", "onnx", "-o", str(tmp_path / "out")], "--format onnx"),
        (["export", M, "--format", "qwen2-moe", "-o", str(tmp_path / "out")], "not a carved model"),
        (["carve", "--recipe", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "out")], "nope.yaml"),
    ]


@pytest.mark.parametrize("case", range(len(outputs(Path("/x")))))
def test_output_and_size_problems_are_found_before_any_heavy_work(capsys, tmp_path, case):
    args, expected = outputs(tmp_path)[case]
    (tmp_path / "file.txt").write_text("not a directory")
    before = tree(tmp_path)
    started = time.perf_counter()
    assert_one_line_error(capsys, args, expected)
    assert time.perf_counter() - started < 30
    assert tree(tmp_path) == before


def test_too_little_free_space_says_both_numbers(capsys, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(artifacts.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    before = tree(tmp_path)
    assert_one_line_error(capsys, ["carve", M, "-o", str(tmp_path / "out"), "--data", VALID, *CAL], "GiB free")
    assert_one_line_error(capsys, ["profile", M, "-o", str(tmp_path / "p"), "--data", VALID, *CAL], "needs about")
    assert tree(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_directory_is_refused_at_once(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert_one_line_error(capsys, ["carve", M, "-o", str(locked / "out"), "--data", VALID, *CAL], "not writable")


def test_a_live_writer_makes_a_second_run_refuse_at_once(capsys, tmp_path):
    import fcntl

    lock = tmp_path / ".out.lock"
    lock.write_text("4242\n")
    with lock.open("r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live writer holds its lock
        assert_one_line_error(
            capsys, ["carve", M, "-o", str(tmp_path / "out"), "--data", VALID, *CAL], "being written by pid 4242"
        )
    assert lock.exists() and not (tmp_path / "out").exists()


def test_a_stale_partial_output_is_removed_with_one_line(capsys, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".out.lock").write_text(f"{dead.pid}\n")
    (tmp_path / ".out.partial").mkdir()
    (tmp_path / ".out.partial" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".out.scratch").write_bytes(b"scratch")
    code, _, err = run(capsys, "carve", M, "--config", "S1A1E4", "-o", str(tmp_path / "out"), "--data", VALID, *CAL)
    assert code == 0, err
    assert f"removed a stale partial output of {tmp_path / 'out'} (pid {dead.pid} is gone)" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_a_failing_writer_leaves_no_scratch_and_no_staging(tmp_path):
    with pytest.raises(OSError, match="No space left"):
        with claimed_output(tmp_path / "out", False) as slot:
            slot.scratch.write_bytes(b"x" * 1000)
            with slot.staged() as staging:
                staging.mkdir()
                (staging / "part").write_bytes(b"y")
                raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    assert artifacts.ABANDONED[-1] == (tmp_path / "out", None)


def test_a_lowercase_config_is_read_and_said(capsys, tmp_path):
    code, _, err = run(capsys, "carve", M, "--config", "s1a1e4", "-o", str(tmp_path / "out"), "--data", VALID, *CAL)
    assert code == 0 and "note: read --config s1a1e4 as S1A1E4" in err, err


def test_resume_after_a_max_steps_stop_needs_no_overwrite(capsys, tmp_path, carved_dir, train_text):
    base = ["finetune", str(carved_dir), "--data", str(train_text), "--seqlen", "64", "--nsamples", "8"]
    base += ["--batch-size", "2", "--eval-windows", "2", "--device", "cpu", "-o", str(tmp_path / "out")]
    code, _, err = run(capsys, *base, "--max-steps", "2")
    assert code == 0, err
    code, _, err = run(capsys, *base, "--resume")
    assert code == 0 and "4 steps" in err, err


# Subprocess faults: the real entry point, real signals.

CARVE_SLOWLY = ["carve", M, "--data", str(TINYSTORIES_TRAIN), "--nsamples", "128", "--seqlen", "256", "--device", "cpu"]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "cmoe.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 120) -> str:
    """Read stderr until a line holds `text` (progress lines are plain: stderr is a pipe)."""
    deadline = time.time() + timeout
    seen = ""
    while time.time() < deadline:
        line = process.stderr.readline()
        seen += line
        if text in line:
            return seen
        assert line or process.poll() is None, seen
    raise AssertionError(f"never printed {text!r}: {seen}")


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_carve_exits_130_or_143_and_keeps_its_finished_layers(tmp_path, signum, code):
    process = start([*CARVE_SLOWLY, "-o", str(tmp_path / "out")], tmp_path)
    seen = wait_for_line(process, "layer 1/2")
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, seen + err
    assert "interrupted; " in err and "1 of 2 layers carved" in err and "--resume" in err, err
    assert "Traceback" not in err
    assert sorted(path.name for path in tmp_path.iterdir()) == [".out.partial"]
    resumed = subprocess.run(
        [sys.executable, "-m", "cmoe.cli", *CARVE_SLOWLY, "-o", str(tmp_path / "out"), "--resume"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_an_interrupt_before_any_layer_is_done_leaves_nothing(tmp_path):
    process = start([*CARVE_SLOWLY, "-o", str(tmp_path / "out")], tmp_path)
    wait_for(tmp_path / ".out.lock", process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and f"nothing was written to {tmp_path / 'out'}" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_interrupted_finetune_keeps_its_checkpoint_and_resumes(tmp_path, carved_dir, train_text):
    args = ["finetune", str(carved_dir), "--data", str(train_text), "--seqlen", "64", "--nsamples", "400"]
    args += ["--batch-size", "2", "--checkpoint-every", "2", "--eval-windows", "2", "--device", "cpu"]
    args += ["-o", str(tmp_path / "tuned")]
    process = start(args, tmp_path)
    wait_for(tmp_path / "tuned.checkpoints" / "step-000002" / "cmoe_progress.json", process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "checkpoint kept at" in err and "--resume" in err and "Traceback" not in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tuned.checkpoints"]


@pytest.mark.slow
def test_kill_9_mid_carve_then_resume_gives_the_bytes_of_an_uninterrupted_carve(tmp_path):
    args = [*CARVE_SLOWLY, "--config", "S1A1E4"]
    whole = subprocess.run(
        [sys.executable, "-m", "cmoe.cli", *args, "-o", str(tmp_path / "whole")], capture_output=True, text=True
    )
    assert whole.returncode == 0, whole.stderr
    process = start([*args, "-o", str(tmp_path / "out")], tmp_path)
    wait_for_line(process, "layer 1/2")
    process.kill()
    process.communicate()
    assert (tmp_path / ".out.lock").exists() and not (tmp_path / "out").exists()
    rerun = subprocess.run(
        [sys.executable, "-m", "cmoe.cli", *args, "-o", str(tmp_path / "out"), "--resume"],
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert weight_bytes(tmp_path / "out") == weight_bytes(tmp_path / "whole")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "whole"]


@pytest.mark.slow
def test_two_carves_to_one_output_the_second_refuses_at_once(tmp_path):
    slow = ["carve", M, "--data", str(TINYSTORIES_TRAIN), "--nsamples", "400", "--seqlen", "256", "--device", "cpu"]
    first = start([*slow, "-o", str(tmp_path / "out")], tmp_path)
    wait_for(tmp_path / ".out.lock", first)
    started = time.perf_counter()
    second = subprocess.run(
        [sys.executable, "-m", "cmoe.cli", *CARVE_SLOWLY, "-o", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert second.returncode == 2 and f"being written by pid {first.pid}" in second.stderr, second.stderr
    assert time.perf_counter() - started < 30
    assert first.poll() is None, "the first carve must still be running"
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    # Under load the first carve may finish a layer before the interrupt: it then keeps its partial output
    # for --resume (test_an_interrupted_carve_... covers that case), never a complete-looking one.
    assert first.returncode == 130 and {path.name for path in tmp_path.iterdir()} <= {".out.partial"}


@pytest.mark.slow
def test_a_full_filesystem_fails_in_one_line_and_leaves_nothing(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip() or 'not permitted'}")
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "cmoe.cli",
                *CARVE_SLOWLY[:-2],
                "--nsamples",
                "2",
                "--seqlen",
                "64",
                "-o",
                str(disk / "out"),
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2, done.stderr
        assert "GiB free" in done.stderr and "Traceback" not in done.stderr
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
