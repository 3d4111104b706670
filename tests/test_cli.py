"""Every bad input answers with one line and a non-zero exit, before any heavy work, without a traceback."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cmoe.cli.main import main

from conftest import TINYSTORIES_MODEL, TINYSTORIES_TRAIN, TINYSTORIES_VALID


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_one_line_error(capsys, args, expected: str) -> None:
    """Exit 2, no traceback, one `error:` line (a usage error may add its usage line before it)."""
    code, out, err = run(capsys, *args)
    lines = [
        line
        for line in err.splitlines()
        if line.strip() and not line.lstrip().startswith(("profile layer", "carve", "export ", "eval layer", "note:"))
    ]
    if lines and lines[0].startswith("Usage: cmoe"):
        lines = lines[1:]
    assert code == 2, err
    assert "Traceback" not in err and "Traceback" not in out
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert expected in err, err


def tree(root) -> set:
    """Every path under `root`, hidden ones included: what a failed command must leave unchanged."""
    return {str(path.relative_to(root)) for path in root.rglob("*")}


@pytest.fixture
def gpt2_dir(tmp_path):
    directory = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64)).save_pretrained(
        directory
    )
    return directory


@pytest.fixture
def texts(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "short.txt").write_text("Once upon a time.")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 50)
    return tmp_path


M = str(TINYSTORIES_MODEL)
CAL = ["--data", str(TINYSTORIES_TRAIN), "--nsamples", "2", "--seqlen", "64", "--device", "cpu"]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["carve", "no/such/./dir", "-o", "{out}", *CAL], "no such file or directory"),
        (["carve", "./missing-model", "-o", "{out}", *CAL], "no such file or directory"),
        (["carve", M, "--config", "S4A5E8", "-o", "{out}", *CAL], "exceeds the number of experts"),
        (["carve", M, "--config", "S1A0E8", "-o", "{out}", *CAL], "active routed experts must be positive"),
        (
            ["carve", M, "--shared", "1", "--active", "1", "--experts", "0", "-o", "{out}", *CAL],
            "experts must be positive",
        ),
        (["carve", M, "--shared", "-1", "--active", "1", "--experts", "8", "-o", "{out}", *CAL], "cannot be negative"),
        (["carve", M, "--config", "S1A1E512", "-o", "{out}", *CAL], "exceed the FFN width (384"),
        (["carve", M, "--config", "S1A1", "-o", "{out}", *CAL], "invalid --config"),
        (
            ["carve", M, "-o", "{out}", "--data", str(TINYSTORIES_TRAIN), "--seqlen", "4096"],
            "above the model's maximum of 512",
        ),
        (
            ["carve", M, "-o", "{out}", "--nsamples", "0", "--data", str(TINYSTORIES_TRAIN), "--seqlen", "64"],
            "--nsamples 0",
        ),
        (["carve", M, "-o", "{out}", "--ka", "0", *CAL], "--ka 0"),
        (["carve", M, "-o", "{out}", "--data", "{tmp}/empty.txt", "--seqlen", "64"], "empty"),
        (["carve", M, "-o", "{out}", "--data", "{tmp}/short.txt", "--seqlen", "64"], "tokens"),
        (["carve", M, "-o", "{out}", "--data", "{tmp}/binary.txt", "--seqlen", "64"], "binary.txt"),
        (["carve", M, "-o", "{out}", "--data", "{tmp}/nope.txt", "--seqlen", "64"], "nope.txt"),
        (["carve", M, "-o", "{tmp}", *CAL], "already exists"),
        (["carve", "{gpt2}", "-o", "{out}", *CAL], "gated MLP"),
        (["profile", "{gpt2}", "-o", "{out}", *CAL], "gated MLP"),
        (["eval", "perplexity", "{gpt2}", "--data", str(TINYSTORIES_VALID)], "decoder layers at model.layers"),
        (["eval", "perplexity", M, "--data", "{tmp}/short.txt", "--seqlen", "64"], "tokens"),
        (["eval", "perplexity", M, "--data", str(TINYSTORIES_VALID), "--max-windows", "0"], "--max-windows 0"),
        (["eval", "perplexity", M, "--data", str(TINYSTORIES_VALID), "--seqlen", "100000"], "maximum"),
        (["carve", M, "-o", "{out}", "--profile", "{tmp}/short.txt"], "profile"),
        (["carve", M, "-o", "{out}", "--device", "quantum", "--data", str(TINYSTORIES_TRAIN)], "--device quantum"),
        (["carve", M, "-o", "{out}", "--dtype", "int3", "--data", str(TINYSTORIES_TRAIN)], "--dtype int3"),
        (["carve", M, "--bogus-option"], "No such option"),
        (["carve", M, "-o", "{out}", "--preset", "fastest", *CAL], "--preset fastest"),
        (["carve", M, "-o", "{out}", "--grouping", "spectral", *CAL], "--grouping spectral"),
        (["carve", M, "-o", "{out}", "--router", "oracle", *CAL], "--router oracle"),
        (["carve", M, "-o", "{out}", "--statistic", "energy", *CAL], "--statistic energy"),
        (["carve", M, "-o", "{out}", "--kmeans-iterations", "-1", *CAL], "--kmeans-iterations -1"),
        (["carve", M, "-o", "{out}", "--budget", "greedy", *CAL], "--budget greedy"),
        (["carve", M, "-o", "{out}", "--refit-down", "--budget", "adaptive", *CAL], "--refit-down"),
        (["carve", M, "-o", "{out}", "--budget-from", "{tmp}/nowhere", *CAL], "no such recipe file"),
        (["carve", M, "-o", "{out}", "--budget-from", "{tmp}/short.txt", *CAL], "not a cmoe recipe"),
        (["carve", M, "-o", "{out}", "--shared-width", "wide", *CAL], "--shared-width wide"),
        (["carve", M, "-o", "{out}", "--refit-down", "--refit-weighting", "loss", *CAL], "--refit-weighting loss"),
        (["carve", M, "-o", "{out}", "--refit-weighting", "residual", *CAL], "add --refit-down"),
        (["carve", M, "-o", "{out}", "--shared-width", "adaptive", "--budget", "adaptive", *CAL], "--budget uniform"),
        (
            [
                "carve",
                M,
                "-o",
                "{out}",
                "--preset",
                "quality",
                "--shared-width",
                "adaptive",
                "--format",
                "qwen2-moe",
                *CAL,
            ],
            "not with --shared-width adaptive",
        ),
        (["carve", M, "-o", "{out}", "--preset", "quality", "--profile", "{tmp}/short.txt"], "--no-refit-down"),
        (
            ["carve", M, "-o", "{out}", "--preset", "quality", "--config", "S1A1E8", "--no-refit-down"]
            + ["--profile", "{tmp}/short.txt"],
            "--reconstruct-steps 0",
        ),
        (["profile", M, "-o", "{out}", "--statistic", "energy", *CAL], "--statistic energy"),
    ],
)
def test_bad_inputs_fail_in_one_line(capsys, tmp_path, texts, gpt2_dir, args, expected):
    fill = {"out": str(tmp_path / "out"), "tmp": str(texts), "gpt2": str(gpt2_dir)}
    before = tree(tmp_path)
    assert_one_line_error(capsys, [arg.format(**fill) for arg in args], expected)
    assert tree(tmp_path) == before


def test_named_source_offline_without_cache_asks_for_a_local_file(capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert_one_line_error(
        capsys, ["carve", M, "-o", str(tmp_path / "out"), "--data", "wikitext2", "--seqlen", "64"], "local file"
    )


@pytest.mark.slow
def test_real_process_prints_no_traceback_and_debug_does(tmp_path):
    args = [sys.executable, "-m", "cmoe.cli", "carve", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]
    quiet = subprocess.run(args, capture_output=True, text=True)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and "no such file" in quiet.stderr
    loud = subprocess.run([*args[:3], "--debug", *args[3:]], capture_output=True, text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_cli_carve_and_eval_json(capsys, tmp_path):
    out = tmp_path / "carved"
    code, _, err = run(capsys, "carve", M, "--config", "S1A1E4", "-o", str(out), *CAL)
    assert code == 0 and "layer 2/2" in err and "wrote" in err
    code, stdout, err = run(
        capsys,
        "eval",
        "perplexity",
        str(out),
        "--data",
        str(TINYSTORIES_VALID),
        "--seqlen",
        "128",
        "--max-windows",
        "3",
        "--json",
        "--device",
        "cpu",
    )
    result = json.loads(stdout)
    assert code == 0 and result["windows"] == 3 and result["tokens"] == 384 and result["seqlen"] == 128
    assert torch.isfinite(torch.tensor(result["perplexity"]))
    code, stdout, _ = run(
        capsys, "eval", "perplexity", M, "--data", str(TINYSTORIES_VALID), "--seqlen", "128", "--max-windows", "3"
    )
    assert code == 0 and "(seqlen 128, 3 windows, 384 tokens)" in stdout


def test_help_explains_every_option(capsys):
    for command in (["carve"], ["profile"], ["eval", "perplexity"]):
        code, out, _ = run(capsys, *command, "--help")
        assert code == 0
        for option in ("--data", "--seqlen", "--device", "--dtype"):
            assert option in out


def test_version_and_completion_are_offered(capsys):
    from importlib.metadata import version

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"cmoe {version('cmoe')}"
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "--install-completion" in out
    code, out, err = run(capsys)  # no command: the whole help, not just its first line
    assert code == 2 and "Commands" in out and "carve" in out and not err.strip()


def test_a_missing_relative_path_is_answered_at_once_not_sent_to_the_hub(capsys, tmp_path, monkeypatch):
    import time

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    started = time.perf_counter()
    assert_one_line_error(capsys, ["eval", "perplexity", "out/ts-S3A3E8", "--data", str(TINYSTORIES_VALID)], "no such")
    assert time.perf_counter() - started < 5


def test_every_command_prints_its_result_as_json_and_creates_missing_parents(capsys, tmp_path):
    out = tmp_path / "new" / "dirs" / "carved"
    code, stdout, err = run(capsys, "carve", M, "--config", "S1A1E4", "-o", str(out), *CAL, "--json")
    carved = json.loads(stdout)
    assert (
        code == 0 and carved["output"] == str(out) and carved["config"] == "S1A1E4" and "total" in carved["timings_s"]
    )
    assert "carve S1A1E4 layer 1/2 (" in err  # plain progress lines: stderr is not a terminal
    profile = tmp_path / "p.safetensors"
    code, stdout, _ = run(capsys, "profile", M, "-o", str(profile), *CAL, "--json")
    assert code == 0 and json.loads(stdout)["num_layers"] == 2
    code, stdout, _ = run(capsys, "export", str(out), "--format", "qwen2-moe", "-o", str(tmp_path / "x"), "--json")
    assert code != 0  # the analytic router has no place in qwen2-moe: refused, nothing printed on stdout
    assert stdout == ""
    routed = tmp_path / "routing"
    args = ["eval", "routing", str(out), "--data", f"v={TINYSTORIES_VALID}", "--seqlen", "64", "-o", str(routed)]
    code, stdout, _ = run(capsys, *args, "--json", "--device", "cpu")
    assert code == 0 and json.loads(stdout)["output"] == str(routed)
