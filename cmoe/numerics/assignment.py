"""Balanced assignment and the balanced / spherical k-means built on it (pure numerics)."""

from typing import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def balanced_assignment(cost: torch.Tensor, cluster_size: int) -> torch.Tensor:
    """Labels (n,) putting exactly `cluster_size` rows in each column's cluster at minimal total cost.

    Solved as one square linear assignment: each cluster's column is repeated `cluster_size` times.
    """
    n, clusters = cost.shape
    if n != clusters * cluster_size:
        raise ValueError(f"{n} neurons do not fill {clusters} clusters of {cluster_size}")
    square = np.repeat(cost.numpy(), cluster_size, axis=1)
    rows, cols = linear_sum_assignment(square)
    labels = np.empty(n, dtype=np.int64)
    labels[rows] = cols // cluster_size
    return torch.from_numpy(labels)


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
