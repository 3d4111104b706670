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

import torch

REFIT_RIDGE = 1e-2


@dataclass
class Piece:
    """One block of features: `features` (n, size) on the tokens `rows` (n,) of the batch."""

    features: torch.Tensor
    rows: torch.Tensor


def accumulate_normal_equations(
    gram: torch.Tensor, cross: torch.Tensor, pieces: list[Piece], offsets: list[int], target: torch.Tensor
) -> None:
    """Add one batch to `gram` += sum_t z_t z_t^T (upper block triangle only) and `cross` += sum_t z_t y_t^T
    (products in fp32 within the batch, sums over batches in the float64 `gram` and `cross`).

    z_t is zero outside the pieces present on token t; piece i occupies columns offsets[i]:offsets[i] + size.
    `target` (T, d) holds the dense outputs y_t of the batch's T tokens. solve_down_projection reads the
    upper triangle only.
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
            start_j = offsets[j]
            end_j = start_j + right.features.shape[1]
            partner = positions[j][left.rows]
            common = partner >= 0
            if not bool(common.any()):
                continue
            product = left.features[common].T @ right.features[partner[common]]
            gram[start_i:end_i, start_j:end_j] += product.double()


def solve_down_projection(
    gram: torch.Tensor, cross: torch.Tensor, initial: torch.Tensor, ridge: float = REFIT_RIDGE
) -> torch.Tensor:
    """argmin_W sum_t |y_t - W z_t|^2 + lambda |W - W0|^2, lambda = ridge * mean(diag(gram)).

    `gram` (F, F) holds sum z z^T in its upper triangle (what accumulate_normal_equations fills; the rest
    is not read) and is overwritten by the Cholesky factor of the ridge system, in place: the fit needs
    no second F x F matrix (at 70B's width each is 6 GiB). `cross` (F, d) = sum z y^T, `initial` W0
    (d, F). Pulling towards W0 rather than zero keeps neurons that the calibration tokens rarely route
    to as they were. Returns W (d, F) in float64.
    """
    penalty = ridge * gram.diagonal().mean().clamp_min(1e-30)
    gram.diagonal().add_(penalty)
    # The transposed view's lower triangle is gram's upper one, all that the factorisation reads.
    lower = gram.T
    info = torch.empty(0, dtype=torch.int32, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(lower, out=(lower, info))
    if int(info):
        raise ValueError(f"the refit's ridge system is not positive definite (minor {int(info)})")
    solution = torch.cholesky_solve(cross.double() + penalty * initial.double().T, factor)
    return solution.T
