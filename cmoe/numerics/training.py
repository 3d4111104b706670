"""Training arithmetic of `cmoe finetune`: the bias-balancing sign rule, step counts, and the seeded order
in which every epoch revisits its draws. Pure functions of their arguments, so a resumed or multi-process
run computes exactly what a single uninterrupted one does."""

import math
import random
from functools import lru_cache

import torch


def balancing_direction(loads: torch.Tensor) -> torch.Tensor:
    """Direction of DeepSeek-V3's auxiliary-loss-free balancing step on the bias b: +1 for experts below
    the mean load, -1 above it, 0 at it (the caller scales it by --bias-speed). Invariant to scaling the
    loads, so it does not matter how many processes or micro-batches counted them."""
    loads = loads.to(torch.float64)
    return torch.sign(loads.mean() - loads)


def planned_steps(nsamples: int, epochs: int, samples_per_step: int) -> int:
    """Optimizer steps of `epochs` passes over `nsamples` windows; a last partial step counts."""
    return math.ceil(nsamples * epochs / samples_per_step)


def sample_position(seed: int, index: int, nsamples: int) -> int:
    """Which of the epoch's `nsamples` draws sample `index` is: every epoch revisits the same draws in
    its own seeded order."""
    epoch, offset = divmod(index, nsamples)
    return epoch_order(seed, epoch, nsamples)[offset]


@lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, nsamples: int) -> tuple[int, ...]:
    """A permutation of the `nsamples` draws, seeded by (seed, epoch); cached since each step reads it."""
    order = list(range(nsamples))
    random.Random(f"cmoe-epoch:{seed}:{epoch}").shuffle(order)
    return tuple(order)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the predicted positions (all but the last, as the language-model loss shifts) of
    KL(teacher || student) between next-token distributions softened by `temperature`, times T^2 so that
    the gradient keeps its scale across temperatures (Hinton et al. 2015). In fp32: half-precision
    log-probabilities of a large vocabulary lose the small differences the KL is made of."""
    student = torch.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    teacher = torch.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    per_token = torch.sum(teacher.exp() * (teacher - student), dim=-1)
    return per_token.mean() * temperature**2
