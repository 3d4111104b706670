"""Recovery fine-tuning recipes on carved SmolLM2-135M: LM loss or distillation, LoRA or full, against training-free.

Carving: `cmoe carve` per --configs and --carves (preset: --preset quality plus --preset-options; reference: the
faithful CMoE reference), calibrated on --calibration-windows seeded windows of --calibration-seqlen tokens of
wiki.valid.tokens. Fine-tuning: `cmoe finetune` per --variants on wiki.valid.tokens, --nsamples windows of --seqlen
tokens, batch --batch-size, one epoch; LoRA runs at --lr, full fine-tuning (--full) at --full-lr; distillation
(--distill W) from the dense model. Evaluation: the first --eval-windows windows of --eval-seqlen tokens of
wiki.test.raw and every --eval-seqlen-token window of the TinyStories validation excerpt (GPTQ protocol) for the
dense model, each training-free carve and each fine-tuned model. Every command runs as a real `cmoe` process
(wall time and peak RSS per process). Carves and fine-tuned models stay under --work; a carve directory holding a
finished model is reused. Rows stream to a JSON-lines log; a rerun with the same --log skips the rows already
there. Then the "Recovery fine-tuning (bench_recovery.py)" section of --results (RESULTS.md) is written from every
row of the log.

    flock /tmp/cmoe-bench.lock python benchmarks/bench_recovery.py [--configs S3A3E8,S1A1E8]
        [--carves preset,reference] [--preset-options "--refit-ridge 0.3"] [--variants NAME,...]
        [--nsamples 128 --seqlen 512 --lr 1e-3 --full-lr 1e-4] [--eval-windows 16]
"""

import argparse
import json
import re
import shlex
import tempfile
from pathlib import Path

import cmoe

import common
from common import TINYSTORIES_VALID, WIKI_TEST, WIKI_VALID, machine, read_log, run_cli, smollm2_gguf, write_section

VARIANTS: dict[str, list[str]] = {
    "lm-lora": [],
    "distill-lora": ["--distill", "1.0"],
    "mixed-lora": ["--distill", "0.5"],
    "lm-full": ["--full"],
    "mixed-full": ["--full", "--distill", "0.5"],
    "distill-full": ["--full", "--distill", "1.0"],
}
CARVES: dict[str, list[str]] = {"preset": ["--preset", "quality"], "reference": []}
WIKI, STORIES = "wiki.test.raw", "TinyStories-valid-excerpt"
TITLE = "Recovery fine-tuning (bench_recovery.py)"


def parse_args() -> argparse.Namespace:
    temp = Path(tempfile.gettempdir())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="Dense model (default: the SmolLM2-135M GGUF).")
    parser.add_argument("--configs", default="S3A3E8,S1A1E8")
    parser.add_argument("--carves", default="preset,reference", help="comma-separated names from CARVES")
    parser.add_argument("--preset-options", default="", help="extra `cmoe carve` options of the preset carve")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--calibration-seqlen", type=int, default=2048)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the LoRA runs")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of the --full runs")
    parser.add_argument("--eval-windows", type=int, default=16, help="wiki.test.raw windows evaluated")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=temp / "cmoe-recovery", help="carved and fine-tuned models")
    parser.add_argument("--log", type=Path, default=temp / "cmoe-recovery.jsonl")
    parser.add_argument("--results", type=Path, default=common.RESULTS, help="the Markdown file to write")
    return parser.parse_args()


def carve_args(name: str, args) -> list[str]:
    extra = shlex.split(args.preset_options) if name == "preset" else []
    return CARVES[name] + extra


def carve_label(name: str, args) -> str:
    return " ".join(carve_args(name, args)) or name


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def perplexity(model: Path, data: Path, seqlen: int, windows: int | None) -> dict:
    """`cmoe eval perplexity` in a fresh process, recording nothing into the model directory."""
    limit = ["--max-windows", str(windows)] if windows else []
    command = ["eval", "perplexity", str(model), "--data", str(data), "--seqlen", str(seqlen), *limit]
    _, _, out = run_cli(*command, "--no-record", "--json", "--device", "cpu")
    result = json.loads(out)
    return {name: result[name] for name in ("perplexity", "windows", "tokens", "seqlen")}


def evaluate(model: Path, args) -> dict:
    return {
        WIKI: perplexity(model, WIKI_TEST, args.eval_seqlen, args.eval_windows),
        STORIES: perplexity(model, TINYSTORIES_VALID, args.eval_seqlen, None),
    }


def carve(model: Path, config: str, options: list[str], directory: Path, args) -> tuple[float, float] | None:
    """Carve into `directory` unless it holds a finished model: (wall seconds, peak RSS MiB), or None if reused."""
    if (directory / "config.json").is_file():
        return None
    seconds, rss, _ = run_cli(
        "carve",
        str(model),
        "--config",
        config,
        *options,
        "-o",
        str(directory),
        "--data",
        str(WIKI_VALID),
        "--nsamples",
        str(args.calibration_windows),
        "--seqlen",
        str(args.calibration_seqlen),
        "--device",
        "cpu",
        "--overwrite",
    )
    return seconds, rss


def finetune(carved: Path, variant: str, output: Path, args) -> dict:
    extra = VARIANTS[variant]
    lr = args.full_lr if "--full" in extra else args.lr
    seconds, rss, _ = run_cli(
        "finetune",
        str(carved),
        *extra,
        "-o",
        str(output),
        "--data",
        str(WIKI_VALID),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(lr),
        "--device",
        "cpu",
        "--overwrite",
    )
    recipe = cmoe.read_recipe(output)["finetune"]
    return {
        "finetune_args": extra,
        "wall_s": seconds,
        "peak_rss_mib": rss,
        "steps": recipe["steps"],
        "tokens": recipe["tokens"],
        "lr": recipe["options"]["lr"],
        "tokens_per_second": recipe["tokens_per_second"],
    }


class Log:
    """The JSON-lines log: rows keyed by (config, carve, fine-tuning), appended as they are measured."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = read_log(path)

    def has(self, key: tuple) -> bool:
        return any(row_key(row) == key for row in self.rows)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as log:
            log.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def row_key(row: dict) -> tuple:
    return row["config"], row["carve"], row["fine_tuning"]


def measure(log: Log, model: Path, config: str, name: str, args) -> None:
    """The training-free carve (config, name) and its fine-tuned variants not yet in the log."""
    label = carve_label(name, args)
    variants = [variant for variant in args.variants.split(",") if not log.has((config, label, variant))]
    if log.has((config, label, "none")) and not variants:
        return
    carved = args.work / f"{config}-{slug(label)}"
    carved_in = carve(model, config, carve_args(name, args), carved, args)
    if not log.has((config, label, "none")):
        seconds, rss = carved_in or (None, None)
        row = {"config": config, "carve": label, "fine_tuning": "none", "carve_wall_s": seconds}
        log.add({**row, "carve_peak_rss_mib": rss, "eval": evaluate(carved, args)})
    for variant in variants:
        tuned = args.work / f"{carved.name}-{variant}"
        run = finetune(carved, variant, tuned, args)
        log.add({"config": config, "carve": label, "fine_tuning": variant, **run, "eval": evaluate(tuned, args)})


def main() -> None:
    args = parse_args()
    model = args.model or smollm2_gguf()
    args.work.mkdir(parents=True, exist_ok=True)
    log = Log(args.log)
    if not log.has(("dense", None, "none")):
        log.add({"config": "dense", "carve": None, "fine_tuning": "none", "eval": evaluate(model, args)})
    for config in args.configs.split(","):
        for name in args.carves.split(","):
            measure(log, model, config, name, args)
    common.RESULTS = args.results
    write_section(TITLE, report(log.rows, model, args))


def ordered(rows: list[dict]) -> list[dict]:
    """Dense first, then each (config, carve) in the order first measured: training-free, then VARIANTS order."""
    groups = list(dict.fromkeys((row["config"], row["carve"]) for row in rows if row["config"] != "dense"))
    tunings = ["none", *VARIANTS]
    carved = [row for row in rows if row["config"] != "dense"]
    carved.sort(key=lambda row: (groups.index(row_key(row)[:2]), tunings.index(row["fine_tuning"])))
    return [row for row in rows if row["config"] == "dense"] + carved


def ppl(row: dict, text: str) -> float:
    return row["eval"][text]["perplexity"]


def table_line(row: dict, dense: dict) -> str:
    gaps = [f"{ppl(row, text):.2f} | {ppl(row, text) / ppl(dense, text) - 1:.2f}" for text in (WIKI, STORIES)]
    seconds = row.get("wall_s", row.get("carve_wall_s"))
    minutes = f"{seconds / 60:.1f}" if seconds else "-"
    return f"| {row['config']} | {row['carve']} | {row['fine_tuning']} | {gaps[0]} | {gaps[1]} | {minutes} |"


def best_sentence(group: list[dict]) -> str:
    """The fine-tuning with the lowest wiki.test.raw perplexity among those not worse on TinyStories."""
    free = group[0]
    kept = [row for row in group[1:] if ppl(row, STORIES) <= ppl(free, STORIES)]
    name = f"{free['config']} {free['carve']}"
    if not kept:
        return (
            f"{name}: no fine-tuning keeps {STORIES} perplexity at or below the training-free {ppl(free, STORIES):.2f}."
        )
    best = min(kept, key=lambda row: ppl(row, WIKI))
    return (
        f"{name}: {best['fine_tuning']} has the lowest {WIKI} perplexity ({ppl(best, WIKI):.2f}, training-free "
        f"{ppl(free, WIKI):.2f}) among the fine-tunings whose {STORIES} perplexity is not worse than the training-free "
        f"{ppl(free, STORIES):.2f}."
    )


def protocol(dense: dict, tuned: list[dict], model: Path, args) -> list[str]:
    wiki, stories = dense["eval"][WIKI], dense["eval"][STORIES]
    steps = ", ".join(sorted({f"{row['steps']} steps / {row['tokens']} tokens" for row in tuned})) or "none run"
    variants = "; ".join(f"{name} `{' '.join(extra) or '(LoRA, LM loss)'}`" for name, extra in VARIANTS.items())
    return [
        f"Machine: {machine()}.",
        f"Model: {model.name} (fp32 on the CPU). Calibration of every carve: {args.calibration_windows} seeded windows "
        f"x {args.calibration_seqlen} tokens of wiki.valid.tokens, seed 0; carve `reference` is the faithful CMoE "
        "reference, the others are the `cmoe carve` options shown.",
        f"Fine-tuning: `cmoe finetune` on wiki.valid.tokens, {args.nsamples} random windows x {args.seqlen} tokens, "
        f"batch {args.batch_size}, one epoch ({steps}), LoRA at LR {args.lr:g}, full fine-tuning (--full) at LR "
        f"{args.full_lr:g}, other options at their defaults; lm: LM loss, distill: KL to the dense model (the "
        f"carve's source), mixed: half of each. Variants: {variants}.",
        f"Evaluation: {WIKI} first {wiki['windows']} windows x {wiki['seqlen']} tokens ({wiki['tokens']} tokens); "
        f"{STORIES} all {stories['windows']} windows x {stories['seqlen']} ({stories['tokens']} tokens); GPTQ "
        "protocol.",
        "Gap = ppl / dense ppl - 1 (the issue's definition). Minutes: the `cmoe carve` command for training-free rows "
        "(- when an existing carve was reused), the `cmoe finetune` command for fine-tuned rows.",
    ]


def report(rows: list[dict], model: Path, args) -> str:
    rows = ordered(rows)
    dense, carved = rows[0], rows[1:]
    tuned = [row for row in carved if row["fine_tuning"] != "none"]
    lines = protocol(dense, tuned, model, args) + [
        "",
        f"| config | carve | fine-tuning | {WIKI} ppl | gap | {STORIES} ppl | gap | minutes |",
        "|---|---|---|---|---|---|---|---|",
        f"| dense | - | none | {ppl(dense, WIKI):.2f} | - | {ppl(dense, STORIES):.2f} | - | - |",
    ]
    lines += [table_line(row, dense) for row in carved]
    groups = dict.fromkeys(row_key(row)[:2] for row in carved)
    sentences = [best_sentence([row for row in carved if row_key(row)[:2] == group]) for group in groups]
    return "\n".join(lines + [""] + sentences)


if __name__ == "__main__":
    main()
