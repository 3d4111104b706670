"""Least-squares refit of a carved block's down projections, with the routing fixed (pure numerics).

Carving drops, for each token, the neurons of the experts it is not routed to. With the routing
fixed, the block's output is linear in its down-projection weights: output = W z, where z stacks
the shared block's hidden state and, for the selected experts only, their gated hidden states.
The W that best reproduces the dense FFN output on the calibration tokens is a ridge regression
towards the carved (dense) weights, solved in closed form: the kept neurons absorb what the
dropped ones carried on average, at no inference cost. Held-out wiki.valid, SmolLM2-135M,
S1A1E8 with the linear router: 660 -> 70 perplexity (benchmarks/bench_preset_selection.py).

The normal equations are accumulated block by block (shared block and routed experts as pieces,
each present on some tokens), so the cost per token is (active neurons)^2, not d_h^2.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from cmoe.registry import Registry

REFIT_RIDGE = 1e-2

RIDGE_SCALES: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("ridge scale", "--refit-ridge-scale")
RIDGE_SCALES.register(
    "mean",
    "every feature pulled by ridge x the mean feature energy",
    lambda energies: energies.mean().expand_as(energies),
)
RIDGE_SCALES.register(
    "feature",
    "each feature pulled by ridge x its own energy: an expert routed on few tokens is pulled in proportion",
    lambda energies: energies.clamp_min(1e-6 * float(energies.mean())),
)


def ridge_penalties(energies: torch.Tensor, ridge: float, scale: str = "mean") -> torch.Tensor:
    """(F,) penalties lambda_i of the refit's features from their energies sum_t z_ti^2 (the Gram diagonal)."""
    return (ridge * RIDGE_SCALES.get(scale)(energies.double())).clamp_min(1e-30)


@dataclass
class Piece:
    """One block of features: `features` (n, size) on the tokens `rows` (n,) of the batch."""

    features: torch.Tensor
    rows: torch.Tensor


class DenseGram:
    """sum_t z_t z_t^T as one (F, F) float64 matrix (upper block triangle filled): any routing."""

    def __init__(self, sizes: list[int], device: torch.device | str):
        self.offsets = [sum(sizes[:index]) for index in range(len(sizes))]
        self.sizes = sizes
        self.matrix = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64, device=device)

    def block(self, i: int, j: int) -> torch.Tensor:
        return self.matrix[self._span(i), self._span(j)]

    def _span(self, index: int) -> slice:
        return slice(self.offsets[index], self.offsets[index] + self.sizes[index])

    def solve(self, cross: torch.Tensor, initial: torch.Tensor, ridge: float, scale: str = "mean") -> torch.Tensor:
        return solve_down_projection(self.matrix, cross, initial, ridge, scale)


class ArrowGram:
    """sum_t z_t z_t^T when no two routed experts share a token (top-1 routing): the shared block's own
    block A (s, s), its blocks with each expert B_e (s, m_e), and each expert's own D_e (m_e, m_e); the
    expert-expert blocks are zero and never stored. At 70B's width (S1A1E8) that is 1.5 GiB where the
    whole (F, F) system is 6.1 GiB; the solution is the same (a Schur-complement solve)."""

    def __init__(self, sizes: list[int], device: torch.device | str, shared: bool):
        self.sizes = sizes
        self.shared = shared
        self.diagonal = [torch.zeros(size, size, dtype=torch.float64, device=device) for size in sizes]
        head = sizes[0] if shared else 0
        # border[e] = B_e; the shared block has none with itself (its own block is diagonal[0]).
        self.border = [
            torch.zeros(head if index else 0, size, dtype=torch.float64, device=device)
            for index, size in enumerate(sizes)
        ]

    def block(self, i: int, j: int) -> torch.Tensor:
        if i == j:
            return self.diagonal[i]
        if self.shared and i == 0:
            return self.border[j]
        raise ValueError(f"pieces {i} and {j} share a token: the arrow system holds top-1 routing only")

    def solve(self, cross: torch.Tensor, initial: torch.Tensor, ridge: float, scale: str = "mean") -> torch.Tensor:
        """The solve_down_projection of the whole system: each expert's block factorised alone, the shared
        block's unknowns from the Schur complement A - sum_e B_e D_e^-1 B_e^T, then each expert's."""
        penalties = ridge_penalties(torch.cat([block.diagonal() for block in self.diagonal]), ridge, scale)
        rhs = (cross.double() + penalties[:, None] * initial.double().T).split(self.sizes)
        penalty = penalties.split(self.sizes)
        experts = range(1 if self.shared else 0, len(self.sizes))
        factors = {index: _factorised(self.diagonal[index], penalty[index]) for index in experts}
        partial = {index: torch.cholesky_solve(rhs[index], factors[index]) for index in experts}
        parts = [None] * len(self.sizes)
        if self.shared:
            schur, reduced = self.diagonal[0], rhs[0].clone()
            for index in experts:
                border = self.border[index]
                schur.sub_(border @ torch.cholesky_solve(border.T, factors[index]))
                reduced -= border @ partial[index]
            parts[0] = torch.cholesky_solve(reduced, _factorised(schur, penalty[0]))
            for index in experts:
                correction = torch.cholesky_solve(self.border[index].T @ parts[0], factors[index])
                partial[index] -= correction
        for index in experts:
            parts[index] = partial[index]
        return torch.cat(parts).T


def _factorised(block: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of `block` + diag(penalty), computed in place from its upper triangle."""
    block.diagonal().add_(penalty)
    lower = block.T
    info = torch.empty(0, dtype=torch.int32, device=block.device)
    factor, info = torch.linalg.cholesky_ex(lower, out=(lower, info))
    if int(info):
        raise ValueError(f"the refit's ridge system is not positive definite (minor {int(info)})")
    return factor


def accumulate_normal_equations(gram, cross: torch.Tensor, pieces: list[Piece], offsets: list[int], target) -> None:
    """Add one batch to the gram += sum_t z_t z_t^T (upper block triangle only, through `gram.block(i, j)`)
    and `cross` += sum_t z_t y_t^T (products in fp32 within the batch, sums over batches in float64).

    z_t is zero outside the pieces present on token t; piece i occupies rows offsets[i]:offsets[i] + size
    of `cross`. `target` (T, d) holds the dense outputs y_t of the batch's T tokens. A pair of pieces that
    shares no token adds nothing (an ArrowGram stores no block for it).
    """
    tokens = target.shape[0]
    positions = []
    for piece in pieces:
        position = torch.full((tokens,), -1, dtype=torch.long, device=target.device)
        position[piece.rows] = torch.arange(len(piece.rows), device=target.device)
        positions.append(position)
    for i, left in enumerate(pieces):
        start_i = offsets[i]
        end_i = start_i + left.features.shape[1]
        cross[start_i:end_i] += (left.features.T @ target[left.rows]).double()
        for j in range(i, len(pieces)):
            right = pieces[j]
            partner = positions[j][left.rows]
            common = partner >= 0
            if not bool(common.any()):
                continue
            gram.block(i, j).add_((left.features[common].T @ right.features[partner[common]]).double())


def solve_down_projection(
    gram: torch.Tensor, cross: torch.Tensor, initial: torch.Tensor, ridge: float = REFIT_RIDGE, scale: str = "mean"
) -> torch.Tensor:
    """argmin_W sum_t |y_t - W z_t|^2 + sum_i lambda_i |w_i - w0_i|^2 over the columns w_i of W, lambda_i =
    ridge * mean(diag(gram)) (`scale` "mean") or ridge * gram_ii ("feature").

    `gram` (F, F) holds sum z z^T in its upper triangle (what accumulate_normal_equations fills; the rest
    is not read) and is overwritten by the Cholesky factor of the ridge system, in place: the fit needs
    no second F x F matrix (at 70B's width each is 6 GiB). `cross` (F, d) = sum z y^T, `initial` W0
    (d, F). Pulling towards W0 rather than zero keeps neurons that the calibration tokens rarely route
    to as they were. Returns W (d, F) in float64.
    """
    penalties = ridge_penalties(gram.diagonal(), ridge, scale)
    factor = _factorised(gram, penalties)
    solution = torch.cholesky_solve(cross.double() + penalties[:, None] * initial.double().T, factor)
    return solution.T
