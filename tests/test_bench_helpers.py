"""Behaviour of the performance helpers in breastgen.engines.perf (no timing assertions)."""

import pytest
import torch
from torch import nn

from breastgen.engines.perf import (CallCounter, Stopwatch, count_flops, load_average, matmul_gflops, median,
                                    num_threads, physical_cores, to_channels_last)
from breastgen.errors import BreastGenError


def test_num_threads_sets_and_restores():
    before = torch.get_num_threads()
    with num_threads(1, blas=True) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with num_threads(None) as n:
        assert n == before
    with pytest.raises(BreastGenError):
        with num_threads(0):
            pass
    assert torch.get_num_threads() == before


def test_count_flops_matches_matmul_formula():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    lin = nn.Linear(16, 4, bias=False)
    x = torch.randn(8, 16)
    # forward + backward (grad of input and of weight): 3 matmuls of the same size
    assert count_flops(lambda: lin(x.requires_grad_()).sum().backward()) == 3 * 2 * 8 * 16 * 4


def test_matmul_gflops_positive_and_validates():
    vals = matmul_gflops(64, repeats=2, threads=1)
    assert len(vals) == 2 and all(v > 0 for v in vals)
    assert len(matmul_gflops(64, repeats=1, threads=1, cpu_time=True)) == 1
    with pytest.raises(BreastGenError):
        matmul_gflops(0)


def test_call_counter_counts_and_delegates():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, scale=1.0):
            return self.lin(x) * scale

        def encode(self, x):
            return x + 1

    net = Net()
    c = CallCounter(net)
    x = torch.randn(5, 3)
    assert torch.equal(c(x, scale=2.0), net(x, scale=2.0))
    c(x[:2])
    assert (c.calls, c.rows) == (2, 7)
    assert torch.equal(c.encode(x), x + 1)  # attribute falls through to the wrapped module
    c.eval()
    assert not net.training  # train/eval reach the wrapped module
    c.reset()
    assert (c.calls, c.rows) == (0, 0)


def test_to_channels_last_keeps_outputs():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 2, 8, 8)
    ref = conv(x)
    to_channels_last(conv)
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    out = conv(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    to_channels_last(conv)  # idempotent: one input hook only
    assert len(conv._forward_pre_hooks) == 1


def test_small_helpers():
    with Stopwatch() as sw:
        sum(range(1000))
    assert sw.wall >= 0 and sw.cpu >= 0
    assert median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(BreastGenError):
        median([])
    assert physical_cores() >= 1
    assert len(load_average()) == 3
