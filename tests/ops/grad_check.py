"""Gradient comparison for the log-prob op tests: relative where the gradient is large enough to carry it."""

import torch

BF16_RTOL = 2**-7  # two bf16 ulps (8 mantissa bits): the op rounds an fp32 gradient to bf16 once
BF16_FLOOR = 1e-4  # |grad| above this is compared relatively; below it, within BF16_FLOOR * BF16_RTOL


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """fp32: rtol 1e-4, atol 2e-6 x scale. bf16: relative BF16_RTOL where |want| > BF16_FLOOR x scale, else absolute."""
    got, want = got.double(), want.double()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6 * scale)
        return
    floor = BF16_FLOOR * scale
    large = want.abs() > floor
    err = (got - want).abs()
    rel = (err[large] / want[large].abs()).max().item() if large.any() else 0.0
    assert rel <= BF16_RTOL, f"bf16 gradient: relative error {rel:.3g} > {BF16_RTOL} on |grad| > {floor:g}"
    small = err[~large].max().item() if (~large).any() else 0.0
    assert small <= floor * BF16_RTOL, f"bf16 gradient: error {small:.3g} > {floor * BF16_RTOL:g} on |grad| <= {floor:g}"
