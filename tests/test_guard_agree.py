"""The values a step is judged on, on one rank (two ranks: test_guard_distributed.py)."""

from __future__ import annotations

import math

import pytest
import torch

from spikedoc.guard.agree import agree


def test_a_finite_loss_and_gradient_norm_are_read_as_they_are():
    values = agree(torch.tensor(2.5), torch.tensor(0.25), rollback_request=False)
    assert (values.loss, values.grad_norm, values.nonfinite_ranks, values.rollback_requests) == (2.5, 0.25, 0, 0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_is_nan_and_counts_as_a_non_finite_rank(bad):
    values = agree(torch.tensor(bad), torch.tensor(0.25), rollback_request=False)
    assert math.isnan(values.loss) and values.grad_norm == 0.25 and values.nonfinite_ranks == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_gradient_norm_is_nan_and_counts_as_a_non_finite_rank(bad):
    values = agree(torch.tensor(2.5), torch.tensor(bad), rollback_request=False)
    assert values.loss == 2.5 and math.isnan(values.grad_norm) and values.nonfinite_ranks == 1


def test_no_loss_is_judged_on_the_gradient_norm_alone_and_is_not_a_fault():
    values = agree(None, torch.tensor(0.25), rollback_request=False)
    assert math.isnan(values.loss) and values.grad_norm == 0.25 and values.nonfinite_ranks == 0


def test_a_low_precision_loss_of_one_element_is_read_as_its_value():
    loss = torch.tensor([2.5], dtype=torch.bfloat16)  # shape (1,), as some losses come
    assert agree(loss, torch.tensor(0.25), rollback_request=False).loss == 2.5


def test_a_rollback_request_is_counted():
    assert agree(torch.tensor(2.5), torch.tensor(0.25), rollback_request=True).rollback_requests == 1
