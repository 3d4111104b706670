"""Balanced assignment and the balanced / spherical k-means built on it (pure numerics)."""

from typing import Callable

import numpy as np
import torch


def balanced_assignment(cost: torch.Tensor, cluster_size: int) -> torch.Tensor:
    """Labels (n,) putting exactly `cluster_size` rows in each column's cluster at minimal total cost.

    Exact in O(n k) memory: the transportation problem with supply 1 per row and demand `cluster_size`
    per cluster (`transport_plan`), whose optimal vertex is a 0/1 plan. The solver is deterministic, so
    among tied optima the same costs always give the same labels.
    """
    n, clusters = cost.shape
    if n != clusters * cluster_size:
        raise ValueError(f"{n} neurons do not fill {clusters} clusters of {cluster_size}")
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    plan = transport_plan(cost.detach().cpu().double().numpy(), cluster_size)
    return torch.from_numpy(labels_of_plan(plan, cluster_size))


def transport_plan(cost: np.ndarray, cluster_size: int) -> np.ndarray:
    """The (n, k) optimal plan by POT's network simplex, with integer marginals.

    The iteration cap is ~300x the pivots measured on Hamming costs (about 0.3 n k); a capped run may be
    suboptimal, so it is an error rather than a result.
    """
    import ot  # deferred: importing POT costs ~0.4 s that only grouping needs

    n, clusters = cost.shape
    supply, demand = np.ones(n), np.full(clusters, float(cluster_size))
    plan, log = ot.emd(supply, demand, cost, numItermax=100 * n * clusters + 100_000, log=True)
    if log["result_code"] != 1:
        raise RuntimeError(f"network simplex stopped before the optimum: {log['warning']}")
    return plan


def labels_of_plan(plan: np.ndarray, cluster_size: int) -> np.ndarray:
    """Each row's cluster, once the plan is checked to be a 0/1 assignment filling every cluster exactly
    (integral by total unimodularity; checked because the labels are only meaningful if it is)."""
    rows = np.arange(plan.shape[0])
    labels = plan.argmax(axis=1)
    one_per_row = np.count_nonzero(plan) == rows.size and bool(np.all(plan[rows, labels] == 1.0))
    if not one_per_row or np.any(np.bincount(labels, minlength=plan.shape[1]) != cluster_size):
        raise RuntimeError("network simplex returned a plan that is not a balanced 0/1 assignment")
    return labels.astype(np.int64)


def refine_until_stable(
    labels: torch.Tensor, update: Callable[[torch.Tensor], torch.Tensor], iterations: int
) -> torch.Tensor:
    """The one convergence loop of every k-means here: apply `update` at most `iterations` times,
    stopping as soon as no label moves."""
    for _ in range(iterations):
        updated = update(labels)
        if torch.equal(updated, labels):
            break
        labels = updated
    return labels


def squared_distances(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(n, c) squared Euclidean distances, in float64."""
    points, centroids = points.double(), centroids.double()
    return (points.square().sum(1, keepdim=True) - 2 * points @ centroids.T + centroids.square().sum(1)).clamp_min(0)


def balanced_kmeans_points(points: torch.Tensor, clusters: int, iterations: int, seed: int) -> torch.Tensor:
    """Labels (n,) of `clusters` equal-size clusters of the rows of `points` (n divisible by `clusters`).

    Seeded random distinct points start as centroids; each pass is one balanced assignment by squared
    distance (exact, see `balanced_assignment`) and a centroid update, until nothing moves.
    """
    size = points.shape[0] // clusters
    start = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(seed))[:clusters]

    def update(labels: torch.Tensor) -> torch.Tensor:
        centroids = torch.stack([points[labels == j].double().mean(0) for j in range(clusters)])
        return balanced_assignment(squared_distances(points, centroids), size)

    return refine_until_stable(balanced_assignment(squared_distances(points, points[start]), size), update, iterations)


def balanced_kmeans(cosine: torch.Tensor, seeds: torch.Tensor, cluster_size: int, iterations: int) -> torch.Tensor:
    """Labels (n,) of equal-size clusters of n unit vectors known only through their cosines.

    Starts with one balanced assignment to the seed vectors, then alternates: each cluster's mean
    direction, one balanced assignment by cosine to those means, until nothing moves or the
    iterations run out. Cosine to a cluster mean: sum_{k in S} K_ik / sqrt(sum_{k,l in S} K_kl).
    """
    cosine = cosine.double()

    def update(labels: torch.Tensor) -> torch.Tensor:
        members = torch.nn.functional.one_hot(labels, seeds.numel()).double()
        towards = cosine @ members
        spread = (members * towards).sum(dim=0).clamp_min(1e-30).sqrt()
        return balanced_assignment(-(towards / spread), cluster_size)

    return refine_until_stable(balanced_assignment(-cosine[:, seeds], cluster_size), update, iterations)


def spherical_kmeans(
    vectors: torch.Tensor, weights: torch.Tensor, clusters: int, iterations: int, seed: int
) -> torch.Tensor:
    """Labels (n,) of weighted unit vectors: seeded distinct starts, then assign by cosine / re-centre
    (a cluster left empty keeps its previous centre)."""
    vectors = torch.nn.functional.normalize(vectors.double(), dim=1)
    clusters = min(clusters, vectors.shape[0])
    start = torch.randperm(vectors.shape[0], generator=torch.Generator().manual_seed(seed))[:clusters]
    centroids = vectors[start]

    def update(labels: torch.Tensor) -> torch.Tensor:
        nonlocal centroids
        sums = torch.zeros_like(centroids).index_add_(0, labels, vectors * weights.double().unsqueeze(1))
        filled = sums.norm(dim=1) > 0
        centroids = torch.where(filled.unsqueeze(1), torch.nn.functional.normalize(sums, dim=1), centroids)
        return (vectors @ centroids.T).argmax(dim=1)

    return refine_until_stable((vectors @ centroids.T).argmax(dim=1), update, iterations)
