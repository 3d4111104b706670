"""The exact balanced assignment of the Hamming grouping at real model widths, against SciPy's square expansion.

Sizes: LLaMA-2-7B at S2A2E16 (11,008 neurons less 2 x 688 shared = 9,632 routed, 14 clusters of 688) and
LLaMA-2-70B at S1A1E8 (28,672 less 3,584 shared = 25,088 routed, 7 clusters of 3,584). Costs are the
reference's integer Hamming costs |c_i - c_s|_1 = cnt_i + cnt_s - 2 C_is between binary mark columns over
--tokens seeded random tokens: each neuron is marked with its own rate drawn from Beta(0.5, 4.5) (mean 10%,
skewed like real activation rates), the k most often marked are the seeds, the other n the routed neurons.
`seconds` is the median of --repeats runs of `balanced_assignment`; SciPy (the former solver: one square
n x n assignment, O(n^2) memory) runs once, only for n <= --scipy-max-n. One JSON line per size, then the
"Balanced assignment (bench_assignment.py)" section of RESULTS.md is written.

flock /tmp/cmoe-bench.lock python benchmarks/bench_assignment.py [--sizes 9632x14,25088x7] [--tokens 4096]
"""

import argparse
import json
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from cmoe.numerics.assignment import balanced_assignment
from common import machine, median_seconds, write_section

TARGETS = {(9632, 14): 2.0, (25088, 7): 10.0}


def hamming_costs(n: int, k: int, tokens: int, seed: int) -> torch.Tensor:
    """(n, k) integer Hamming costs between seeded random mark columns (marks drawn in blocks of tokens)."""
    rng = np.random.default_rng(seed)
    rates = rng.beta(0.5, 4.5, size=n + k).astype(np.float32)
    marks = [rng.random((min(512, tokens - start), n + k), dtype=np.float32) < rates for start in range(0, tokens, 512)]
    counts = sum(block.sum(0, dtype=np.float64) for block in marks)
    seeds = np.argsort(-counts, kind="stable")[:k]
    routed = np.setdiff1d(np.arange(n + k), seeds)
    coact = sum(block[:, routed].T.astype(np.float32) @ block[:, seeds].astype(np.float32) for block in marks)
    return torch.from_numpy(counts[routed, None] + counts[None, seeds] - 2.0 * coact.astype(np.float64))


def scipy_square_expansion(cost: torch.Tensor, cluster_size: int) -> np.ndarray:
    """The former solver: each cluster's column repeated `cluster_size` times, one square assignment."""
    square = np.repeat(cost.numpy(), cluster_size, axis=1)
    rows, cols = linear_sum_assignment(square)
    labels = np.empty(cost.shape[0], dtype=np.int64)
    labels[rows] = cols // cluster_size
    return labels


def total_cost(cost: torch.Tensor, labels) -> int:
    return int(cost[torch.arange(cost.shape[0]), torch.as_tensor(labels)].sum())


def measure(n: int, k: int, args) -> dict:
    cost = hamming_costs(n, k, args.tokens, seed=n)
    labels = balanced_assignment(cost, n // k)
    row = {"n": n, "k": k, "seconds": median_seconds(lambda: balanced_assignment(cost, n // k), args.repeats)}
    row.update(scipy_seconds=None, cost=total_cost(cost, labels), scipy_cost=None)
    if n <= args.scipy_max_n:
        start = time.perf_counter()
        reference = scipy_square_expansion(cost, n // k)
        row.update(scipy_seconds=time.perf_counter() - start, scipy_cost=total_cost(cost, reference))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="9632x14,25088x7", help="n x k pairs")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scipy-max-n", type=int, default=9632)
    args = parser.parse_args()
    rows = []
    for size in args.sizes.split(","):
        n, k = (int(part) for part in size.split("x"))
        rows.append(measure(n, k, args))
        print(json.dumps(rows[-1]), flush=True)
    write_section("Balanced assignment (bench_assignment.py)", report(rows, args))


def report(rows: list, args) -> str:
    lines = [
        f"Machine: {machine()}. Timings may include load from other work sharing the machine's cores. "
        f"Costs: the reference's integer Hamming costs between binary mark columns over {args.tokens} seeded "
        "random tokens, each neuron marked at its own rate drawn from Beta(0.5, 4.5) (mean 10%), the k most "
        "often marked neurons as seeds. cmoe: POT's network simplex on the n x k transportation problem, median "
        f"of {args.repeats} runs; SciPy: the former square n x n expansion, one run (n <= {args.scipy_max_n}).",
        "",
        "| n | k | cmoe (s) | target (s) | SciPy (s) | total cost | SciPy total cost |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        target = TARGETS.get((row["n"], row["k"]))
        scipy_seconds = "-" if row["scipy_seconds"] is None else f"{row['scipy_seconds']:.1f}"
        scipy_cost = "-" if row["scipy_cost"] is None else f"{row['scipy_cost']:,}"
        lines.append(
            f"| {row['n']:,} | {row['k']} | {row['seconds']:.2f} | {'-' if target is None else f'{target:g}'} "
            f"| {scipy_seconds} | {row['cost']:,} | {scipy_cost} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
