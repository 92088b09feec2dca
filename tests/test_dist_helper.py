import pytest
import torch

from lightning_bn.moments import all_reduce_sum, reduce_across_processes
from tests.dist import run_distributed


def _sum_and_max(rank: int, world_size: int) -> tuple:
    x = torch.tensor([rank + 1.0, 10.0 * (rank + 1), -rank], dtype=torch.float64, requires_grad=True)
    reduced = all_reduce_sum(x)
    (reduced * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    mixed = reduce_across_processes(x.detach(), max_mask=torch.tensor([False, True, False]))
    return reduced.detach(), x.grad, mixed


def test_reductions_over_two_processes() -> None:
    results = run_distributed(_sum_and_max, 2)
    for reduced, grad, mixed in results:
        torch.testing.assert_close(reduced, torch.tensor([3.0, 30.0, -1.0], dtype=torch.float64))
        # d/dx_r of sum_r' w . (sum_r x_r) is w on every process, summed over the 2 processes' losses.
        torch.testing.assert_close(grad, torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64))
        torch.testing.assert_close(mixed, torch.tensor([3.0, 20.0, -1.0], dtype=torch.float64))


def _fails(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank 1")


def test_failure_is_reported() -> None:
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_distributed(_fails, 2, timeout=60)
