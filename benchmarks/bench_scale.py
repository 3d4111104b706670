"""Memory and time you can plan with: one decoder layer at LLaMA-2-7B and LLaMA-3-70B shapes, and a real
carve of a synthetic sharded Llama of about 0.4B parameters, loaded one layer at a time, against the same
carve with the model loaded whole.

Layers: a one-layer Llama at each shape (random weights, bf16 on disk, vocabulary 8,192), carved with
`cmoe carve --preset quality` (linear router, down-projection refit) on 8 x 2,048 tokens of
wiki.valid.tokens, fp32 on this CPU, in a fresh process: per-stage seconds from its recipe, peak RSS,
and the profile bytes per layer (with and without the k-means Gram). The whole-model carve on this
machine is projected as once-only stages plus the per-layer stages times the depth; on one A100 / H100 by
FLOPs: the matmul stages (profile, refit, propagate) scaled by this CPU's measured fp32 matmul rate
against half the GPU's dense bf16 peak, the assignment (CPU, in the solver) kept as measured.

The model (24 layers, hidden 1,024, FFN 4,096, vocabulary 8,192, untied head, random weights) is
written by this script in bf16 shards of at most 200 MB, with the TinyStories tokenizer (its ids fit the
vocabulary). `cmoe carve --config S1A1E8` on 8 x 2,048 tokens of wiki.valid.tokens runs in a fresh
process (peak RSS from the kernel); the whole-model carve runs `carve_model` on `from_pretrained` and
the same writer, also in a fresh process. Both outputs must be equal bit for bit. Then the "Scale
(bench_scale.py)" section of RESULTS.md is written.

`--part deep-layer` (not part of `all`) carves a two-layer model at one shape (`--shape`, `--options=...`,
`--nsamples`) and writes the seconds one layer of a deep model pays per stage, including those a one-layer
model cannot show (the dense stream of --refit-drift, propagation).

flock /tmp/cmoe-bench.lock python benchmarks/bench_scale.py [--work DIR] [--part layers|end-to-end|deep-layer|all]
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

# name: (hidden, FFN, heads, KV heads, depth, real vocabulary, the config whose assignment the issue sizes)
LAYER_SHAPES = {
    "LLaMA-2-7B": (4096, 11008, 32, 32, 32, 32000, "S2A2E16"),
    "LLaMA-3-70B": (8192, 28672, 64, 8, 80, 128256, "S1A1E8"),
}
LAYER_CARVE = ["--preset", "quality", "--data", str(WIKI_VALID), "--nsamples", "8", "--seqlen", "2048"]
ONCE_STAGES = ("calibration_data", "load_model", "capture")
MATMUL_STAGES = ("profile", "refit", "propagate")
# Dense bf16 tensor-core peaks (TFLOP/s); the projection assumes half of it is reached.
GPU_BF16_PEAK = {"A100": 312.0, "H100": 989.0}

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


def one_layer_model(directory: Path, shape: tuple, layers: int = 1) -> None:
    """A Llama of `layers` decoder layers (one by default) at `shape`, random bf16 weights made in bf16 (no
    fp32 copy), in 2 GB shards."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (directory / "config.json").exists():
        return
    hidden, ffn, heads, kv_heads = shape[:4]
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=8192,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        LlamaForCausalLM(config).save_pretrained(directory, max_shard_size="2GB")
    finally:
        torch.set_default_dtype(default)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(directory)


def cpu_matmul_tflops() -> float:
    """This CPU's fp32 matmul rate (TFLOP/s) on 4096-wide products, the unit the projection scales by."""
    import torch

    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    a @ b
    started = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * 4096**3 / (time.perf_counter() - started) / 1e12


def layer_rows(work: Path) -> list[dict]:
    from cmoe.io.profile_format import profile_bytes_per_layer
    from cmoe.numerics.statistics import OPTIONAL_STATISTICS

    rate = cpu_matmul_tflops()
    rows = []
    for name, shape in LAYER_SHAPES.items():
        hidden, ffn, heads, kv_heads, depth, vocabulary, config = shape
        model, out = work / f"layer-{name}", work / f"layer-{name}-carved"
        one_layer_model(model, shape)
        subprocess.run(["rm", "-rf", str(out)], check=True)
        try:
            seconds, rss, _ = run_cli(
                "carve", str(model), "-o", str(out), "--config", config, *LAYER_CARVE, "--device", "cpu"
            )
        except SystemExit as failure:  # e.g. killed for memory: reported in the table, the other shapes still run
            rows.append({"shape": name, "hidden": hidden, "ffn": ffn, "config": config, "failed": str(failure)[-300:]})
            print(json.dumps(rows[-1]), flush=True)
            continue
        stages = _timings(out)
        per_layer = {stage: value for stage, value in stages.items() if stage not in (*ONCE_STAGES, "total")}
        once = sum(stages.get(stage, 0.0) for stage in ONCE_STAGES)
        synthetic_embeddings, real_embeddings = (2 * words * hidden * 4 for words in (8192, vocabulary))
        gpu = {}
        for device, peak in GPU_BF16_PEAK.items():
            scale = rate / (peak / 2)
            layer_gpu = sum(v * (scale if k in MATMUL_STAGES else 1.0) for k, v in per_layer.items())
            gpu[device] = depth * layer_gpu + once * scale
        rows.append(
            {
                "shape": name,
                "hidden": hidden,
                "ffn": ffn,
                "depth": depth,
                "config": config,
                "wall_s": seconds,
                "peak_rss_mib": rss,
                "stages_s": per_layer,
                "once_s": once,
                "profile_bytes": profile_bytes_per_layer(ffn, hidden),
                "profile_bytes_with_gram": profile_bytes_per_layer(ffn, hidden, OPTIONAL_STATISTICS),
                "projected_cpu_s": once + depth * sum(per_layer.values()),
                "projected_peak_rss_mib": rss + (real_embeddings - synthetic_embeddings) / 2**20,
                "projected_gpu_s": gpu,
                "cpu_matmul_tflops": rate,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def layer_report(all_rows: list[dict]) -> str:
    rows = [row for row in all_rows if "failed" not in row]
    stages = list(dict.fromkeys(stage for row in rows for stage in row["stages_s"]))
    lines = [
        f"Machine: {machine()}; fp32 matmul rate measured here {rows[0]['cpu_matmul_tflops']:.3f} TFLOP/s.",
        "",
        "One decoder layer (random weights, bf16 on disk, fp32 compute), `cmoe carve --preset quality` on "
        "8 x 2,048 tokens of wiki.valid.tokens; seconds per stage of that layer:",
        "",
        "| shape | config | " + " | ".join(stages) + " | peak RSS (MiB) | profile MiB/layer (with --gram) |",
        "|---|---|" + "---|" * len(stages) + "---|---|",
    ]
    for row in rows:
        cells = " | ".join(f"{row['stages_s'].get(stage, 0.0):.1f}" for stage in stages)
        lines.append(
            f"| {row['shape']} (d {row['hidden']}, d_h {row['ffn']}) | {row['config']} | {cells} | "
            f"{row['peak_rss_mib']:.0f} | {row['profile_bytes'] / 2**20:.0f} "
            f"({row['profile_bytes_with_gram'] / 2**20:.0f}) |"
        )
    lines += [
        "",
        "Projected whole-model carve (once-only stages plus depth x the layer's stages; peak RSS plus the real "
        "vocabulary's fp32 embeddings and head):",
        "",
        "| model | layers | this CPU | peak RSS (GiB) | one A100 (by FLOPs) | one H100 (by FLOPs) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['shape']} | {row['depth']} | {row['projected_cpu_s'] / 60:.0f} min | "
            f"{row['projected_peak_rss_mib'] / 1024:.1f} | {row['projected_gpu_s']['A100'] / 60:.1f} min | "
            f"{row['projected_gpu_s']['H100'] / 60:.1f} min |"
        )
    lines += [
        "",
        "GPU figures are projections, not measurements: matmul stages at half the dense bf16 peak, the "
        "assignment (group) at this CPU's time. Memory on a GPU: one layer's weights and statistics on the "
        "device, activations on the host. A one-layer model has no propagate stage (the last layer is not "
        "propagated): a deep model pays one carved-layer forward more per layer, less than its profile stage.",
    ]
    from cmoe.io.profile_format import profile_bytes_per_layer
    from cmoe.numerics.statistics import OPTIONAL_STATISTICS

    for row in all_rows:
        if "failed" in row:
            plain = profile_bytes_per_layer(row["ffn"], row["hidden"]) / 2**30
            gram = profile_bytes_per_layer(row["ffn"], row["hidden"], OPTIONAL_STATISTICS) / 2**30
            reason = (row["failed"].strip().splitlines() or ["killed"])[-1]
            lines += [
                "",
                f"{row['shape']} (d {row['hidden']}, d_h {row['ffn']}, {row['config']}): the carve failed on this "
                f"machine ({reason}); profile bytes per layer at that width {plain:.2f} GiB ({gram:.2f} GiB with "
                "--gram).",
            ]
    return "\n".join(lines)


# Runs of a stage in a carve of L layers, where not L: the dense stream starts at layer 1 (layer 0 reads the
# embeddings), the last layer is neither propagated nor checkpointed, layer 0 is read once more before the
# loop (the additivity check).
STAGE_RUNS = {"dense_stream": -1, "propagate": -1, "resume_state": -1, "load_layer": +1}
# Stages whose work does not grow with the calibration tokens (the assignment reads the statistics only; the
# reconstruction's steps draw --reconstruct-tokens each, its one pass over every token is a small share).
TOKEN_FREE_STAGES = ("group", "load_layer", "write", "reconstruct")
LAYERS = 2


def deep_layer_row(work: Path, name: str, nsamples: int, options: list[str]) -> dict:
    """A two-layer model at the shape `name`, carved with `options`: the seconds one layer of a deep model
    pays per stage (each stage's total over its runs, see STAGE_RUNS)."""
    hidden, ffn, heads, kv_heads, depth, vocabulary, config = LAYER_SHAPES[name]
    model, out = work / f"two-layers-{name}", work / f"two-layers-{name}-carved"
    one_layer_model(model, LAYER_SHAPES[name], layers=LAYERS)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    data = ["--data", str(WIKI_VALID), "--nsamples", str(nsamples), "--seqlen", "2048", "--device", "cpu"]
    seconds, rss, _ = run_cli("carve", str(model), "-o", str(out), "--config", config, *options, *data)
    stages = _timings(out)
    per_layer = {
        stage: value / (LAYERS + STAGE_RUNS.get(stage, 0))
        for stage, value in stages.items()
        if stage not in (*ONCE_STAGES, "total")
    }
    return {
        "shape": name,
        "hidden": hidden,
        "ffn": ffn,
        "depth": depth,
        "config": config,
        "options": " ".join(options),
        "nsamples": nsamples,
        "wall_s": seconds,
        "peak_rss_mib": rss,
        "stages_s": per_layer,
    }


def deep_layer_report(row: dict, windows: int) -> str:
    stages = list(row["stages_s"])
    layer = sum(row["stages_s"].values())
    token_free = sum(row["stages_s"].get(stage, 0.0) for stage in TOKEN_FREE_STAGES)
    scaled = token_free + (layer - token_free) * windows / row["nsamples"]
    cells = " | ".join(f"{row['stages_s'][stage]:.1f}" for stage in stages)
    return "\n".join(
        [
            f"Machine: {machine()}.",
            "",
            f"A two-layer Llama at {row['shape']} shapes (d {row['hidden']}, d_h {row['ffn']}, random weights, bf16 "
            f"on disk, fp32 compute), `cmoe carve --config {row['config']} {row['options']}` on {row['nsamples']} x "
            "2,048 tokens of wiki.valid.tokens: the seconds one layer of a deep model pays per stage (each stage's "
            "total over its runs: dense_stream starts at layer 1, the last layer is neither propagated nor "
            "checkpointed (resume_state), layer 0 is read once more before the loop):",
            "",
            "| shape | config | " + " | ".join(stages) + " | per layer | peak RSS (MiB) |",
            "|---|---|" + "---|" * len(stages) + "---|---|",
            f"| {row['shape']} | {row['config']} | {cells} | {layer:.1f} | {row['peak_rss_mib']:.0f} |",
            "",
            f"On {windows} windows (what `--preset quality` calibrates on when --nsamples is not given) every stage "
            f"but {', '.join(TOKEN_FREE_STAGES)} reads each token, so one layer takes about {scaled:.0f} s here "
            f"(a projection: measured stages times {windows}/{row['nsamples']}), {row['depth']} layers about "
            f"{row['depth'] * scaled / 3600:.1f} h on this CPU, once-only stages aside.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cmoe-scale")
    parser.add_argument("--part", choices=("layers", "end-to-end", "deep-layer", "all"), default="all")
    parser.add_argument("--shape", choices=tuple(LAYER_SHAPES), default="LLaMA-2-7B", help="for --part deep-layer")
    parser.add_argument("--nsamples", type=int, default=8, help="calibration windows of --part deep-layer")
    parser.add_argument("--options", default="--preset quality", help="carve options of --part deep-layer (one string)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.part in ("layers", "all"):
        write_section("Scale per layer (bench_scale.py)", layer_report(layer_rows(args.work)))
    if args.part == "deep-layer":
        row = deep_layer_row(args.work, args.shape, args.nsamples, args.options.split())
        print(json.dumps(row), flush=True)
        title = f"Scale per layer of a deep model, {args.shape}, {args.options} (bench_scale.py)"
        write_section(title, deep_layer_report(row, windows=32))
    if args.part in ("end-to-end", "all"):
        end_to_end(args.work)


def end_to_end(work: Path) -> None:
    model = work / "synthetic-0.4b"
    parameters, disk = synthetic_model(model)
    lazy_out, whole_out = work / "lazy", work / "whole"
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
