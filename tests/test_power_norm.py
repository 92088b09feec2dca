"""PowerNorm (kind "power") against a float64 transcription of the authors' algorithm, step by step.

The reference below follows ``MaskPowerNorm`` / ``PowerFunction`` of github.com/sIncerass/powernorm
(``fairseq/modules/norms/mask_powernorm.py``): group scaling, the batch quadratic mean over the real tokens, the
warm-up switch, the cumulative-then-moving running quadratic mean, and the approximate backward with ``ema_gz``,
written out by hand (the approximate gradient is injected at the group-scaled tensor, and the exact gradient of
group scaling follows by autograd).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_bn import padding_mask
from lightning_bn.layers import PowerNorm, build_norm
from lightning_bn.layers._power import group_scaling

C, GROUPS = 6, 2


class _Reference:
    """The authors' PowerNorm in float64 on channels-last tokens ``(N, T, C)``, statistics over real tokens."""

    def __init__(self, weight: Tensor, bias: Tensor, warmup: int, alpha_fwd: float, alpha_bkw: float) -> None:
        self.weight, self.bias, self.warmup = weight.clone(), bias.clone(), warmup
        self.alpha_fwd, self.alpha_bkw, self.eps = alpha_fwd, alpha_bkw, 1e-5
        self.running_phi = torch.ones(C, dtype=torch.float64)
        self.ema_gz = torch.zeros(C, dtype=torch.float64)
        self.iters = 0

    def step(self, x: Tensor, mask: Tensor, upstream: Tensor) -> dict[str, Tensor]:
        x = x.clone().requires_grad_()
        grouped = x.reshape(*x.shape[:-1], GROUPS, C // GROUPS)
        scaled = (grouped / torch.sqrt((grouped * grouped).mean(-1, keepdim=True) + 1e-5)).reshape(x.shape)
        real = scaled.detach()[mask]  # (M, C)
        batch_sq = (real * real).mean(0)
        self.iters += 1
        t = self.iters
        phi = batch_sq if t <= self.warmup else self.running_phi.clone()
        z = scaled.detach() / torch.sqrt(phi + self.eps)
        y = self.weight * z + self.bias
        if t < self.warmup:
            self.running_phi = self.running_phi * (t - 1) / t + batch_sq / t
        self.running_phi = self.alpha_fwd * self.running_phi + (1 - self.alpha_fwd) * batch_sq
        # backward by hand
        g = upstream * self.weight
        x_tilde = g - (1 - self.alpha_bkw) * self.ema_gz * z
        x_tilde = torch.where(mask[..., None], x_tilde, g)  # padding: no correction
        self.ema_gz = self.ema_gz + (x_tilde * z)[mask].mean(0)
        grad_scaled = x_tilde / torch.sqrt(batch_sq + self.eps)
        (grad_x,) = torch.autograd.grad(scaled, x, grad_scaled)
        return {
            "y": y,
            "grad": grad_x,
            "weight": (upstream * z).sum((0, 1)),
            "bias": upstream.sum((0, 1)),
            "running_phi": self.running_phi.clone(),
            "ema_gz": self.ema_gz.clone(),
        }


def _close(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
@pytest.mark.parametrize("padded", [False, True])
def test_power_norm_matches_reference_before_and_after_warmup(layout: str, padded: bool) -> None:
    warmup = 3
    pn = build_norm("power", C, layout=layout, warmup_iters=warmup, num_groups=GROUPS, alpha_fwd=0.8, alpha_bkw=0.7)
    pn = pn.double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        pn.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        pn.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
    reference = _Reference(pn.weight.detach(), pn.bias.detach(), warmup, 0.8, 0.7)
    lengths = [5, 2, 4] if padded else [5, 5, 5]
    mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    for step in range(6):  # steps 1-3 in warm-up (the cumulative average in 1-2), 4-6 with running_phi
        x = torch.randn(3, 5, C, generator=gen, dtype=torch.float64) * 1.5 + 2.0  # a mean: not subtracted
        x = torch.where(mask[..., None], x, torch.full_like(x, 50.0))
        upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64) * mask[..., None]
        expected = reference.step(x, mask, upstream)
        inp = (x if layout == "channels_last" else x.transpose(1, 2).contiguous()).requires_grad_()
        pn.weight.grad = pn.bias.grad = None
        if padded:
            with padding_mask(mask):
                out = pn(inp)
        else:
            out = pn(inp)
        up = upstream if layout == "channels_last" else upstream.transpose(1, 2)
        out.backward(up)
        y = out if layout == "channels_last" else out.transpose(1, 2)
        grad = inp.grad if layout == "channels_last" else inp.grad.transpose(1, 2)
        assert torch.isfinite(y).all()
        _close(y, expected["y"])
        _close(grad, expected["grad"])
        _close(pn.weight.grad, expected["weight"])
        _close(pn.bias.grad, expected["bias"])
        _close(pn.running_phi, expected["running_phi"])
        _close(pn.ema_gz, expected["ema_gz"])
        assert int(pn.iters) == step + 1
    # after the warm-up the forward uses the running statistic: a different batch scale does not change z's scale
    assert not torch.allclose(pn.running_phi, torch.ones(C, dtype=torch.float64))


def test_power_norm_without_padding_equals_authors_code_exactly() -> None:
    """Without a mask the backward's mean is over every position, as in the authors' code (here all real)."""
    pn = PowerNorm(C, warmup_iters=2, num_groups=1, layout="channels_last").double()
    x = torch.randn(4, 3, C, dtype=torch.float64, requires_grad=True)
    pn(x).sum().backward()
    # authors' code on (T, B, C) = x.transpose(0, 1) with group_num=1, by hand: step 1 is in warm-up
    xt = x.detach()
    scaled = xt / torch.sqrt((xt * xt).mean(-1, keepdim=True) + 1e-5)
    batch_sq = (scaled * scaled).mean((0, 1))
    _close(pn.running_phi, batch_sq)  # step 1 < warmup: the cumulative average (batch_sq), then 0.9 b + 0.1 b
    z = scaled / torch.sqrt(batch_sq + 1e-5)
    _close(pn.ema_gz, z.mean((0, 1)))  # g = 1, ema_gz was 0: mean(g * z)


def test_eval_mode_is_exact_and_passes_gradcheck() -> None:
    pn = PowerNorm(C, num_groups=GROUPS, layout="channels_first").double()
    with torch.no_grad():
        pn.running_phi.uniform_(0.5, 2.0)
        pn.weight.uniform_(0.5, 1.5)
        pn.bias.normal_()
    pn.eval()
    x = torch.randn(2, C, 3, dtype=torch.float64, requires_grad=True)
    expected = group_scaling(x, 1, GROUPS) / torch.sqrt(pn.running_phi + pn.eps).view(1, C, 1)
    expected = expected * pn.weight.view(1, C, 1) + pn.bias.view(1, C, 1)
    _close(pn(x), expected)
    assert torch.autograd.gradcheck(lambda t, w, b: _eval(pn, t, w, b), (x, pn.weight, pn.bias))
    with padding_mask(torch.zeros(2, 3, dtype=torch.bool)):  # eval needs no batch statistic: no error
        _close(pn(x), expected)


def _eval(pn: PowerNorm, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    saved = pn.weight, pn.bias
    pn.weight, pn.bias = weight, bias  # type: ignore[assignment]
    try:
        return pn(x)
    finally:
        pn.weight, pn.bias = saved


def test_group_scaling_formula_and_gradcheck() -> None:
    x = torch.randn(3, 4, C, dtype=torch.float64, requires_grad=True)
    groups = x.detach().reshape(3, 4, GROUPS, C // GROUPS)
    expected = (groups / torch.sqrt((groups**2).mean(-1, keepdim=True) + 1e-5)).reshape(x.shape)
    _close(group_scaling(x, 2, GROUPS), expected)
    assert torch.autograd.gradcheck(lambda t: group_scaling(t, 2, GROUPS), (x,))
    assert torch.autograd.gradcheck(
        lambda t: group_scaling(t, 1, 3), (torch.randn(2, C, 3, dtype=torch.float64, requires_grad=True),)
    )


def test_training_backward_is_the_approximation_not_the_exact_gradient() -> None:
    """Negative control: in warm-up the forward is x / psi_B, whose exact gradient differs from the approximate one
    (the correction uses the moving average, not this batch's mean(g z))."""
    pn = PowerNorm(C, warmup_iters=10, layout="channels_last").double()
    with torch.no_grad():
        pn.ema_gz.fill_(3.0)
    x = torch.randn(4, 5, C, dtype=torch.float64, requires_grad=True)
    (pn(x) ** 2).sum().backward()
    approx = x.grad.clone()
    x.grad = None
    scaled = group_scaling(x, 2, 1)
    exact_out = scaled / torch.sqrt((scaled * scaled).mean((0, 1)) + 1e-5)
    (exact_out**2).sum().backward()
    assert not torch.allclose(approx, x.grad, atol=1e-3)


def test_compiled_power_norm_matches_eager_without_graph_breaks() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = PowerNorm(C, warmup_iters=2, num_groups=GROUPS, layout="channels_last")
    compiled_module = PowerNorm(C, warmup_iters=2, num_groups=GROUPS, layout="channels_last")
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_module, backend=backend, fullgraph=True)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 3])[:, None]
    gen = torch.Generator().manual_seed(1)
    for step in range(4):  # across the end of the warm-up: the switch is a tensor, not a recompile
        x = torch.randn(2, 5, C, generator=gen)
        for masked in (False, True):
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            if masked:
                with padding_mask(mask):
                    ya, yb = eager(a), compiled(b)
            else:
                ya, yb = eager(a), compiled(b)
            ya.pow(2).sum().backward()
            yb.pow(2).sum().backward()
            torch.testing.assert_close(yb, ya)
            torch.testing.assert_close(b.grad, a.grad)
        if step == 0:
            frames = backend.frame_count
    torch.testing.assert_close(compiled_module.ema_gz, eager.ema_gz)
    torch.testing.assert_close(compiled_module.running_phi, eager.running_phi)
    assert backend.frame_count == frames <= 2
    assert sum(counters["graph_break"].values()) == 0


def test_power_norm_bad_input() -> None:
    with pytest.raises(ValueError, match="`num_groups`=4 must divide `num_features`=6"):
        PowerNorm(6, num_groups=4)
    with pytest.raises(ValueError, match="`alpha_fwd` must be in"):
        PowerNorm(6, alpha_fwd=1.5)
    with pytest.raises(ValueError, match="`warmup_iters` must be an int >= 0, got -1"):
        PowerNorm(6, warmup_iters=-1)
    with pytest.raises(ValueError, match="layout"):
        PowerNorm(6, layout="nhwc")
    pn = PowerNorm(C, layout="channels_last")
    with pytest.raises(ValueError, match="expected 6 channels"):
        pn(torch.randn(2, 3, 4))
    with padding_mask(torch.ones(2, 4, dtype=torch.bool)), pytest.raises(ValueError, match=r"PowerNorm.*\(2, 3\)"):
        pn(torch.randn(2, 3, C))
    with padding_mask(torch.zeros(2, 3, dtype=torch.bool)), pytest.raises(ValueError, match="no real token, got 0"):
        pn(torch.randn(2, 3, C))
    assert int(pn.iters) == 0  # the failed steps changed nothing


def test_loads_the_authors_buffer_shapes() -> None:
    pn = PowerNorm(C)
    state = pn.state_dict()
    state["running_phi"] = torch.full((1, C, 1, 1), 2.0)
    state["ema_gz"] = torch.full((1, C, 1, 1), 0.5)
    state["iters"] = torch.tensor([7])
    pn.load_state_dict(state)
    assert pn.running_phi.shape == (C,) and float(pn.running_phi[0]) == 2.0 and int(pn.iters) == 7
