"""`cmoe eval tasks`: downstream accuracy through lm-evaluation-harness (the optional `eval` extra).

The model and tokenizer are loaded by cmoe and handed to lm-eval's HF wrapper, so carved models need no
remote code and exported ones load through their native transformers classes. lm-eval scores whole
sequences, so the model is loaded whole on the compute device (not layer by layer, as perplexity is).
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cmoe.errors import CmoeError
from cmoe.io.loading import is_carved, load_model, load_tokenizer, prepare_model
from cmoe.io.model_card import record_results, recording_directory
from cmoe.io.artifacts import versions
from cmoe.recipes import Compute

# The zero-shot suite the CMoE and LLaMA-MoE papers report (MMLU, 5-shot in the papers, on request).
DEFAULT_TASKS = ("piqa", "winogrande", "arc_easy", "arc_challenge", "hellaswag", "boolq")
INSTALL_HINT = 'cmoe eval tasks needs lm-evaluation-harness: pip install "cmoe[eval]"'
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


@dataclass(frozen=True)
class TaskOptions:
    """What `cmoe eval tasks` runs, validated before the model is read."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    limit: float | None = None
    num_fewshot: int | None = None
    include_path: Path | None = None

    def __post_init__(self) -> None:
        if not self.tasks or any(not name.strip() for name in self.tasks):
            raise CmoeError("--tasks: give at least one task name (comma-separated, e.g. piqa,arc_easy)")
        if self.limit is not None and (self.limit <= 0 or (self.limit >= 1 and self.limit != int(self.limit))):
            raise CmoeError(f"--limit {self.limit:g}: a number of examples (1 or more) or a fraction in (0, 1)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise CmoeError(f"--num-fewshot {self.num_fewshot}: must be 0 or more")
        if self.include_path is not None and not self.include_path.is_dir():
            raise CmoeError(f"--include-path {self.include_path}: no such directory (expected a folder of task YAMLs)")

    @property
    def lm_eval_limit(self) -> int | float | None:
        return int(self.limit) if self.limit is not None and self.limit >= 1 else self.limit


def parse_tasks(spec: str) -> tuple[str, ...]:
    """`piqa, arc_easy` -> ("piqa", "arc_easy"); empty names are refused by TaskOptions."""
    return tuple(name.strip() for name in spec.split(","))


def run_tasks(model: str, options: TaskOptions, compute: Compute = Compute(), record: bool | None = None) -> dict:
    """lm-eval's scores for MODEL (dense, carved or exported) on the options' tasks, with the protocol;
    saved into the model's recipe and card when `record` (None: when MODEL is a directory cmoe wrote)."""
    started = time.perf_counter()
    lm_eval = _lm_eval()
    prepared = prepare_model(model, compute.device, compute.dtype)
    target = recording_directory(prepared.source, record)
    task_manager = _task_manager(lm_eval, options)
    tokenizer = load_tokenizer(prepared.source)
    if is_carved(prepared.config):
        from cmoe.io.carved import load_carved

        loaded = load_carved(prepared.source.location, prepared.device, prepared.dtype)
    else:
        loaded = load_model(prepared.source, prepared.dtype).to(prepared.device)
    from lm_eval.models.huggingface import HFLM

    wrapper = HFLM(pretrained=loaded, tokenizer=tokenizer, backend="causal", batch_size=compute.batch_size, device=None)
    output = lm_eval.simple_evaluate(
        model=wrapper,
        tasks=list(options.tasks),
        num_fewshot=options.num_fewshot,
        limit=options.lm_eval_limit,
        task_manager=task_manager,
        log_samples=False,
        **SEEDS,
    )
    result = {
        "model": prepared.source.description,
        "tasks": {name: _task_result(name, output) for name in output["results"]},
        "protocol": {
            "harness": "lm-evaluation-harness",
            "limit": options.limit,
            "num_fewshot": options.num_fewshot,
            "batch_size": compute.batch_size,
            "device": str(prepared.device),
            "dtype": str(prepared.dtype).removeprefix("torch."),
            "include_path": str(options.include_path.resolve()) if options.include_path else None,
            "seeds": SEEDS,
        },
        "versions": versions(),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if target is not None:
        record_results(target, results_for_card(result))
        result["recorded_in"] = str(target)
    return result


def results_for_card(result: dict) -> list[dict]:
    """The tasks' scores as model-card result entries (one per task, every metric with its stderr)."""
    entries = []
    for name, task in result["tasks"].items():
        metrics = [
            {"type": metric, "value": value, "stderr": task["stderr"].get(metric)}
            for metric, value in task["metrics"].items()
        ]
        dataset = task["dataset"]
        entries.append(
            {
                "task": name,
                "dataset": {"name": dataset.get("name") or name, "type": dataset.get("path") or name},
                "metrics": metrics,
                "protocol": {**result["protocol"], "num_fewshot": task["num_fewshot"], "samples": task["samples"]},
            }
        )
    return entries


def _task_result(name: str, output: dict) -> dict:
    """One task's (or group's) metrics: lm-eval's `acc,none` keys as `acc`, stderrs apart."""
    metrics, stderr = {}, {}
    for key, value in output["results"][name].items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or not isinstance(value, (int, float)):
            continue
        label = metric if filter_name == "none" else f"{metric},{filter_name}"
        if metric.endswith("_stderr"):
            stderr[label.replace("_stderr", "", 1)] = value if isinstance(value, float) else None
        else:
            metrics[label] = value
    config = output.get("configs", {}).get(name, {})
    samples = output.get("n-samples", {}).get(name, {})
    return {
        "metrics": metrics,
        "stderr": stderr,
        "samples": samples.get("effective"),
        "num_fewshot": output.get("n-shot", {}).get(name),
        "version": output.get("versions", {}).get(name),
        "dataset": {"path": config.get("dataset_path"), "name": config.get("dataset_name")},
    }


def _lm_eval():
    try:
        import lm_eval
    except ImportError as error:
        raise CmoeError(INSTALL_HINT) from error
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return lm_eval


def _task_manager(lm_eval, options: TaskOptions):
    """lm-eval's task index, every requested task checked by name before the model is read. Local tasks
    alone index in a second; the built-in index (thousands of YAMLs) is built only when it is needed."""
    from lm_eval.tasks import TaskManager

    include = str(options.include_path) if options.include_path else None
    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if not _unknown(local, options.tasks):
            return local
    manager = TaskManager(include_path=include)
    unknown = _unknown(manager, options.tasks)
    if unknown:
        raise CmoeError(
            f"--tasks: unknown task {', '.join(unknown)} (see `lm-eval ls tasks`, or pass --include-path DIR "
            "for local task YAMLs)"
        )
    return manager


def _unknown(manager, names: tuple[str, ...]) -> list[str]:
    known = set(manager.all_tasks)
    return [name for name in names if name not in known]
