"""Memory and time you can plan with: a real carve of a synthetic sharded Llama of about 0.4B parameters,
loaded one layer at a time, against the same carve with the model loaded whole.

The model (24 layers, hidden 1,024, FFN 4,096, vocabulary 8,192, untied head, random weights) is
written by this script in bf16 shards of at most 200 MB, with the TinyStories tokenizer (its ids fit the
vocabulary). `cmoe carve --config S1A1E8` on 8 x 2,048 tokens of wiki.valid.tokens runs in a fresh
process (peak RSS from the kernel); the whole-model carve runs `carve_model` on `from_pretrained` and
the same writer, also in a fresh process. Both outputs must be equal bit for bit. Then the "Scale
(bench_scale.py)" section of RESULTS.md is written.

flock /tmp/cmoe-bench.lock python benchmarks/bench_scale.py [--work DIR]
"""

import argparse
import filecmp
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import WIKI_VALID, machine, run_cli, write_section

HERE = Path(__file__).resolve().parent
TOKENIZER = HERE.parents[1] / "shared" / "models" / "tinystories-656k"
SHAPE = {"num_hidden_layers": 24, "hidden_size": 1024, "intermediate_size": 4096, "vocab_size": 8192}
CARVE = ["--config", "S1A1E8", "--data", str(WIKI_VALID), "--nsamples", "8", "--seqlen", "2048", "--device", "cpu"]

WHOLE_MODEL_CARVE = """
import resource, sys, time
from pathlib import Path
from cmoe import Calibration, CarveOptions, MoEShape
from cmoe.carving import calibration_tokens, carve_model
from cmoe.io.artifacts import StageTimer
from cmoe.io.carved import save_carved
from cmoe.io.loading import load_model, prepare_model
model, data, out = sys.argv[1:]
started = time.perf_counter()
prepared = prepare_model(model, "cpu", "auto", kind="dense")
tokenizer, windows, _ = calibration_tokens(Calibration(data, 8, 2048, 0), prepared, StageTimer())
carved = carve_model(load_model(prepared.source, prepared.dtype), windows, CarveOptions(MoEShape.parse("S1A1E8")))
save_carved(carved, tokenizer, Path(out), {})
print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def synthetic_model(directory: Path) -> tuple[int, int]:
    """Write the random bf16 model in shards of at most 200 MB; (parameters, bytes on disk)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not (directory / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(
            **SHAPE,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            dtype="bfloat16",
        )
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(directory, max_shard_size="200MB")
        AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(directory)
    size = sum(path.stat().st_size for path in directory.glob("*.safetensors"))
    return size // 2, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cmoe-scale")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "synthetic-0.4b"
    parameters, disk = synthetic_model(model)
    lazy_out, whole_out = args.work / "lazy", args.work / "whole"
    for out in (lazy_out, whole_out):
        subprocess.run(["rm", "-rf", str(out)], check=True)
    lazy_seconds, lazy_rss, _ = run_cli("carve", str(model), "-o", str(lazy_out), *CARVE)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", WHOLE_MODEL_CARVE, str(model), str(WIKI_VALID), str(whole_out)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    whole_seconds, whole_rss = (float(value) for value in done.stdout.split())
    whole_seconds = max(whole_seconds, time.perf_counter() - started)
    files = sorted(path.name for path in lazy_out.glob("*.safetensors")) + ["model.safetensors.index.json"]
    identical = all(filecmp.cmp(lazy_out / name, whole_out / name, shallow=False) for name in files)
    fp32_gib = parameters * 4 / 2**30
    row = {
        "parameters": parameters,
        "checkpoint_bytes": disk,
        "fp32_weights_gib": fp32_gib,
        "lazy": {"wall_s": lazy_seconds, "peak_rss_mib": lazy_rss},
        "whole": {"wall_s": whole_seconds, "peak_rss_mib": whole_rss},
        "target_peak_rss_mib": (fp32_gib / 2 + 0.6) * 1024,
        "identical_output": identical,
        "recipe_timings_s": json.loads(json.dumps(_timings(lazy_out))),
    }
    print(json.dumps(row))
    write_section("Scale (bench_scale.py)", report(row))


def _timings(directory: Path) -> dict:
    from cmoe import read_recipe

    return read_recipe(directory)["timings_s"]


def report(row: dict) -> str:
    lazy, whole = row["lazy"], row["whole"]
    timings = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in row["recipe_timings_s"].items())
    return "\n".join(
        [
            f"Machine: {machine()}; peak RSS of the benchmark process itself {_self_rss():.0f} MiB.",
            "",
            f"Synthetic Llama, 24 layers, hidden 1024, FFN 4096, vocabulary 8192, untied head: "
            f"{row['parameters'] / 1e6:.0f}M parameters, {row['checkpoint_bytes'] / 2**20:.0f} MiB of bf16 shards "
            f"(at most 200 MB each), {row['fp32_weights_gib']:.2f} GiB as fp32. `cmoe carve {' '.join(CARVE[:2])}` "
            "on 8 x 2,048 tokens of wiki.valid.tokens, fp32 on the CPU, in a fresh process each.",
            "",
            "| loading | peak RSS (MiB) | wall (s) |",
            "|---|---|---|",
            f"| per layer (cmoe carve) | {lazy['peak_rss_mib']:.0f} | {lazy['wall_s']:.1f} |",
            f"| whole model (from_pretrained + carve_model) | {whole['peak_rss_mib']:.0f} | {whole['wall_s']:.1f} |",
            "",
            f"Target: at most half the fp32 weights plus 0.6 GiB = {row['target_peak_rss_mib']:.0f} MiB "
            f"({'met' if lazy['peak_rss_mib'] <= row['target_peak_rss_mib'] else 'NOT met'}). "
            f"Outputs bit for bit equal: {'yes' if row['identical_output'] else 'NO'}. "
            f"Stage seconds of the per-layer carve: {timings}.",
        ]
    )


def _self_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
