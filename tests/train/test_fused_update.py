"""stages.train.fused_update: the clip, AdamW and the EMA as one pass, against the three passes it replaces."""
import math

import torch

from stages.train.config import TrainDiffusionConfig
from tests.train.test_diffusion import TINY


def _trainer(fused: bool, grad_clip: float = 1.0, weight_decay: float = 0.0):
    from stages.models.dit import create_dit
    from stages.train.diffusion_step import DiffusionTraining

    torch.manual_seed(0)
    model = create_dit("ditdh-s", 96, 4, 10, **{k: v for k, v in TINY.items() if k != "model"}).double()
    with torch.no_grad():  # move adaLN-Zero's zero layers, so every parameter has a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = TrainDiffusionConfig(latents="-", out="-", **TINY, batch_size=8, precision="fp32", device="cpu",
                               grad_clip=grad_clip, weight_decay=weight_decay, ema_decay=0.9)
    return DiffusionTraining(model, cfg, torch.device("cpu"), shift=1.0, null_label=10, fused_update=fused)


def _train(trainer, steps: range, x, labels) -> list[float]:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the noise, times and loss in float64 too
    try:
        return [float(trainer.train_step(s, x, labels, lr=1e-3 * (1 - s / 10))[1]) for s in steps]
    finally:
        torch.set_default_dtype(default)


def _close(a: dict, b: dict, rtol: float) -> None:
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=1e-15), k


def test_fused_update_is_adamw_with_the_clip_and_the_ema_in_float64():
    torch.manual_seed(1)
    x, labels = torch.randn(8, 96, 4, 4, dtype=torch.float64), torch.randint(0, 10, (8,))
    # A small clip, so the coefficient is below 1 and matters; and weight decay, which the recipe leaves at 0.
    for clip, wd in ((0.05, 0.1), (0.0, 0.0)):
        today, fused = _trainer(False, clip, wd), _trainer(True, clip, wd)
        assert fused.update.fused and not today.update.fused
        norms_today, norms_fused = _train(today, range(6), x, labels), _train(fused, range(6), x, labels)
        assert all(math.isfinite(n) and n > 0 for n in norms_today)
        assert max(abs(a / b - 1) for a, b in zip(norms_today, norms_fused)) < 1e-12  # same gradients each step
        if clip:
            assert min(norms_today) > clip  # the clip acted on every step
        _close(today.model.state_dict(), fused.model.state_dict(), 1e-12)
        _close(today.ema.state_dict(), fused.ema.state_dict(), 1e-12)
        moved = max((p - q).abs().max().item() for p, q in zip(fused.model.parameters(), _trainer(False).model.parameters()))
        assert moved > 1e-4  # the comparison is of trained weights, not of the start
        # The optimiser state is AdamW's own, so either path resumes the other's checkpoint.
        a, b = today.optimizer.state_dict()["state"], fused.optimizer.state_dict()["state"]
        assert a.keys() == b.keys()
        for i in a:
            assert a[i].keys() == b[i].keys() == {"step", "exp_avg", "exp_avg_sq"}
            assert float(a[i]["step"]) == float(b[i]["step"]) == 6 and a[i]["step"].dtype == b[i]["step"].dtype
            _close(a[i], b[i], 1e-12)


def test_a_fused_run_resumes_from_a_checkpoint_of_the_three_pass_update_and_the_other_way():
    torch.manual_seed(2)
    x, labels = torch.randn(8, 96, 4, 4, dtype=torch.float64), torch.randint(0, 10, (8,))
    straight = _trainer(False)
    _train(straight, range(6), x, labels)
    for first, second in ((False, True), (True, False)):
        a = _trainer(first)
        _train(a, range(3), x, labels)
        b = _trainer(second)
        b.load_state_dict(a.state_dict())
        _train(b, range(3, 6), x, labels)
        _close(straight.model.state_dict(), b.model.state_dict(), 1e-12)
        _close(straight.ema.state_dict(), b.ema.state_dict(), 1e-12)


def test_a_step_where_a_parameter_has_no_gradient_takes_the_three_passes():
    torch.manual_seed(3)
    x, labels = torch.randn(8, 96, 4, 4, dtype=torch.float64), torch.randint(0, 10, (8,))
    today, fused = _trainer(False), _trainer(True)
    for trainer in (today, fused):  # a layer the loss does not reach: no gradient at all
        trainer.model.blocks[0].attn.proj.register_forward_hook(lambda m, i, o: o.detach())
    _train(today, range(3), x, labels), _train(fused, range(3), x, labels)
    assert fused.model.blocks[0].attn.proj.weight.grad is None
    _close(today.model.state_dict(), fused.model.state_dict(), 1e-12)
    _close(today.ema.state_dict(), fused.ema.state_dict(), 1e-12)
