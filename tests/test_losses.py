"""The plain-PyTorch losses (``ltscale.losses``) against hand-computed values and known identities.

Expected values are written out with ``math`` on tiny inputs (2 x 3 logits), not by calling the
function under test or the torch function it wraps, so a wrong formula cannot agree with itself.

Run:  python -m pytest tests/test_losses.py -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltscale.losses import functional as L
from ltscale.losses.modules import (
    ClassificationLoss,
    LossConfig,
    distillation_losses,
    effective_number_weights,
)

# fp32 arithmetic on O(1) values: a few ulp of float32 (eps 1.2e-7) is all the slack needed.
RTOL = 1e-6
ATOL = 1e-6

STUDENT = [[1.0, 2.0, 3.0], [1.0, 0.0, -1.0]]
TEACHER = [[0.5, -1.0, 2.0], [3.0, 1.0, 0.0]]
TARGETS = [2, 0]
COUNTS = [100, 10, 1]


def _close(actual: torch.Tensor, expected: float) -> None:
    assert actual.dim() == 0 and actual.dtype == torch.float32
    assert actual.item() == pytest.approx(expected, rel=RTOL, abs=ATOL)


# ---- hand-written maths (python floats) ------------------------------------------------------


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _ce_row(row: list[float], target: int) -> float:
    return -row[target] + math.log(sum(math.exp(v) for v in row))


def _ce(logits: list[list[float]], targets: list[int]) -> float:
    return sum(_ce_row(r, t) for r, t in zip(logits, targets)) / len(targets)


def _bsce(logits, targets, counts) -> float:
    shifted = [[v + math.log(n) for v, n in zip(row, counts)] for row in logits]
    return _ce(shifted, targets)


def _power_target(row: list[float], temperature: float, power: float) -> list[float]:
    """DiVE's definition, literally: softmax(z / T) ** p, renormalised."""
    raised = [q**power for q in _softmax(row, temperature)]
    total = sum(raised)
    return [r / total for r in raised]


def _kd(student, teacher, temperature, power=1.0) -> float:
    total = 0.0
    for s_row, t_row in zip(student, teacher):
        target = _power_target(t_row, temperature, power)
        student_probs = _softmax(s_row, temperature)
        total += sum(p * (math.log(p) - math.log(q)) for p, q in zip(target, student_probs))
    return temperature**2 * total / len(student)


def _ldam_margins(counts, max_margin):
    raw = [n**-0.25 for n in counts]
    return [m * max_margin / max(raw) for m in raw]


def _ldam(logits, targets, counts, max_margin, scale, weights=None) -> float:
    margins = _ldam_margins(counts, max_margin)
    numerator = denominator = 0.0
    for row, y in zip(logits, targets):
        shifted = [scale * (v - (margins[y] if c == y else 0.0)) for c, v in enumerate(row)]
        w = 1.0 if weights is None else weights[y]
        numerator += w * _ce_row(shifted, y)
        denominator += w
    return numerator / denominator  # torch's weighted mean divides by the sum of target weights


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _y() -> torch.Tensor:
    return torch.tensor(TARGETS)


def _n() -> torch.Tensor:
    return torch.tensor(COUNTS)


# ---- against hand-computed values ------------------------------------------------------------


def test_cross_entropy_hand_computed():
    # row 0: -3 + log(e + e^2 + e^3) = 0.40760596; row 1: -1 + log(e + 1 + e^-1) = 0.40760596
    expected = _ce(STUDENT, TARGETS)
    assert expected == pytest.approx(0.4076059644, abs=1e-9)
    _close(L.cross_entropy(_t(STUDENT), _y()), expected)


def test_balanced_softmax_hand_computed():
    expected = _bsce(STUDENT, TARGETS, COUNTS)
    _close(L.balanced_softmax_cross_entropy(_t(STUDENT), _y(), _n()), expected)
    # the prior shift must change the loss here (tail target in row 0), or the test proves nothing
    assert abs(expected - _ce(STUDENT, TARGETS)) > 1.0
    # Row by row: the two rows mirror each other (reversed and shifted, targets 2 and 0), so over the
    # batch "- log n" gives the same mean as "+ log n"; a single row tells the sign.
    for row, target in zip(STUDENT, TARGETS):
        _close(L.balanced_softmax_cross_entropy(_t([row]), torch.tensor([target]), _n()), _bsce([row], [target], COUNTS))
    assert _bsce(STUDENT[:1], TARGETS[:1], COUNTS) != pytest.approx(_bsce(STUDENT[:1], TARGETS[:1], [1 / n for n in COUNTS]))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
def test_kd_hand_computed(temperature):
    _close(L.kd_loss(_t(STUDENT), _t(TEACHER), temperature), _kd(STUDENT, TEACHER, temperature))


@pytest.mark.parametrize("power", [0.5, 0.25])
def test_kd_with_power_normalisation_hand_computed(power):
    _close(L.kd_loss(_t(STUDENT), _t(TEACHER), 3.0, power), _kd(STUDENT, TEACHER, 3.0, power))


def test_teacher_distribution_is_the_power_normalised_softmax():
    got = L.teacher_distribution(_t(TEACHER), temperature=3.0, power=0.5)
    for row_got, row in zip(got.tolist(), TEACHER):
        assert row_got == pytest.approx(_power_target(row, 3.0, 0.5), rel=RTOL, abs=ATOL)


def test_virtual_example_rule_picks_the_least_flattening_that_lifts_the_tail():
    """Two classes, head (200 images) and tail (10). Three images score [1.5, 0] and one [0, 10]:
    v_tail - v_head = tanh(5 / tau) - 3 tanh(0.75 / tau) at tau = T / p, negative below tau ~2.25,
    positive above. The rule must take tau = 3 (T = 3, p = 1), not the first meeting setting in T
    order (T = 2, p = 0.5: tau = 4) and not a larger T at an equal tau."""
    from ltscale.stages.virtual_examples import VirtualExampleSums, rule_of_thumb

    def choose_setting(logits, counts, temperatures, powers):
        sums = VirtualExampleSums(temperatures, powers, len(counts), logits.device)
        sums.add(logits[:2])  # in two batches, as a loader feeds them
        sums.add(logits[2:])
        return rule_of_thumb(sums.rows(), counts)

    logits = torch.tensor([[1.5, 0.0]] * 3 + [[0.0, 10.0]])
    chosen, rows = choose_setting(logits, np.array([200, 10]), temperatures=range(1, 11), powers=(1.0, 0.5))
    assert (chosen["temperature"], chosen["power"]) == (3.0, 1.0)
    assert len(rows) == 20 and chosen["tail_mean"] >= chosen["head_mean"]
    for row in rows:  # the brute-force reading of the rule, and the distribution depends on T / p only
        tau = row["temperature"] / row["power"]
        difference = math.tanh(5 / tau) - 3 * math.tanh(0.75 / tau)
        assert row["tail_mean"] - row["head_mean"] == pytest.approx(difference, abs=1e-5)
        assert (difference >= 0) == (tau >= 3)
    # Equal tau: the power-normalised setting (smaller T) is taken.
    chosen, _ = choose_setting(logits, np.array([200, 10]), temperatures=(4, 2), powers=(1.0, 0.5))
    assert (chosen["temperature"], chosen["power"]) == (2.0, 0.5)
    # A medium class (50 images) that the teacher never scores is in neither mean: the head is the
    # many-shot classes only, so the choice stays tau = 3 (a head that took the medium class would
    # be met at once, tau = 1).
    with_medium = torch.tensor([[1.5, -5.0, 0.0]] * 3 + [[0.0, -5.0, 10.0]])
    chosen, _ = choose_setting(with_medium, np.array([200, 50, 5]), temperatures=range(1, 11), powers=(1.0, 0.5))
    assert (chosen["temperature"], chosen["power"]) == (3.0, 1.0)


def test_dive_hand_computed():
    temperature, power, alpha = 3.0, 0.5, 0.5
    expected = alpha * _kd(STUDENT, TEACHER, temperature, power) + (1 - alpha) * _bsce(STUDENT, TARGETS, COUNTS)
    got = L.dive_loss(_t(STUDENT), _t(TEACHER), _y(), _n(), temperature, power, alpha)
    _close(got, expected)


def test_ssd_hybrid_hand_computed():
    hard = [[0.2, -0.3, 1.1], [2.0, 0.1, 0.4]]
    expected = 0.7 * _ce(hard, TARGETS) + 1.9 * _kd(STUDENT, TEACHER, 2.0)
    got = L.ssd_hybrid_loss(_t(hard), _t(STUDENT), _y(), _t(TEACHER), temperature=2.0, hard_weight=0.7, soft_weight=1.9)
    _close(got, expected)
    # the defaults are SSD's lambda1 = lambda2 = 1, T = 2
    _close(L.ssd_hybrid_loss(_t(hard), _t(STUDENT), _y(), _t(TEACHER)), _ce(hard, TARGETS) + _kd(STUDENT, TEACHER, 2.0))


def test_ldam_hand_computed():
    cosine = [[0.125, -0.25, 0.75], [0.875, 0.375, -0.5]]  # a normalised head's logits lie in [-1, 1]
    expected = _ldam(cosine, TARGETS, COUNTS, max_margin=0.5, scale=30.0)
    _close(L.ldam_loss(_t(cosine), _y(), _n(), max_margin=0.5, scale=30.0), expected)
    weights = [0.2, 0.5, 2.3]
    expected_weighted = _ldam(cosine, TARGETS, COUNTS, 0.5, 30.0, weights)
    assert abs(expected_weighted - expected) > 1e-3  # the weights matter for these targets
    _close(L.ldam_loss(_t(cosine), _y(), _n(), 0.5, 30.0, class_weights=torch.tensor(weights)), expected_weighted)


def test_ldam_margins_proportional_to_inverse_fourth_root():
    counts = torch.tensor([5000, 625, 16, 1, 81])
    margins = L.ldam_margins(counts, max_margin=0.5)
    # n^-1/4 for these counts is 1/(5000^.25), 1/5, 1/2, 1, 1/3: the rarest class gets max_margin
    expected = torch.tensor([0.5 * 5000**-0.25, 0.1, 0.25, 0.5, 0.5 / 3])
    torch.testing.assert_close(margins, expected, rtol=RTOL, atol=0)
    assert margins.max().item() == 0.5
    products = margins * counts.double().pow(0.25)
    torch.testing.assert_close(products, torch.full_like(products, 0.5), rtol=RTOL, atol=0)


# ---- identities --------------------------------------------------------------------------------


def _random_logits(rows: int, classes: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_at_power_one_is_hinton_kd(temperature):
    student, teacher = _random_logits(6, 11, 0), _random_logits(6, 11, 1)
    hinton = temperature**2 * F.kl_div(
        F.log_softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1), reduction="batchmean"
    )
    torch.testing.assert_close(L.kd_loss(student, teacher, temperature, power=1.0), hinton, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("temperature", "power"), [(3.0, 0.5), (2.0, 0.25), (1.0, 0.7)])
def test_power_normalisation_is_a_teacher_temperature_of_t_over_p(temperature, power):
    teacher = _random_logits(5, 9, 2)
    powered = torch.softmax(teacher.double() / temperature, dim=1) ** power
    powered = powered / powered.sum(dim=1, keepdim=True)
    torch.testing.assert_close(powered, torch.softmax(teacher.double() * power / temperature, dim=1))
    torch.testing.assert_close(L.teacher_distribution(teacher, temperature, power), powered.float(), rtol=1e-6, atol=1e-7)
    # and KD_{T,p} is KD whose teacher side alone runs at T / p (the student side stays at T)
    student = _random_logits(5, 9, 3)
    kl = F.kl_div(F.log_softmax(student / temperature, dim=1), powered.float(), reduction="batchmean")
    torch.testing.assert_close(L.kd_loss(student, teacher, temperature, power), temperature**2 * kl, rtol=1e-6, atol=1e-6)


def test_bsce_is_ce_with_a_log_prior_shift_and_scale_invariant_in_the_counts():
    logits, targets = _random_logits(7, 5, 4), torch.tensor([0, 1, 2, 3, 4, 4, 0])
    counts = torch.tensor([400, 120, 30, 8, 2])
    log_prior = counts.double().log() - math.log(counts.sum().item())  # log pi_c = log n_c - log N
    expected = F.cross_entropy((logits.double() + log_prior), targets).float()
    torch.testing.assert_close(L.balanced_softmax_cross_entropy(logits, targets, counts), expected, rtol=1e-6, atol=1e-6)
    # multiplying every count by 7 adds log 7 to every logit: softmax is shift invariant
    torch.testing.assert_close(
        L.balanced_softmax_cross_entropy(logits, targets, counts * 7), expected, rtol=1e-6, atol=1e-6
    )


def test_dive_endpoints_are_bsce_and_kd():
    student, teacher = _random_logits(4, 6, 5), _random_logits(4, 6, 6)
    targets, counts = torch.tensor([0, 5, 2, 5]), torch.tensor([60, 30, 15, 8, 4, 2])
    at_zero = L.dive_loss(student, teacher, targets, counts, 3.0, 0.5, alpha=0.0)
    at_one = L.dive_loss(student, teacher, targets, counts, 3.0, 0.5, alpha=1.0)
    assert at_zero.item() == L.balanced_softmax_cross_entropy(student, targets, counts).item()
    assert at_one.item() == L.kd_loss(student, teacher, 3.0, 0.5).item()
    assert abs(at_zero.item() - at_one.item()) > 1e-2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
def test_kd_gradient_wrt_student(temperature):
    student = _random_logits(4, 7, 7).requires_grad_(True)
    teacher = _random_logits(4, 7, 8)
    L.kd_loss(student, teacher, temperature).backward()
    p_teacher = torch.softmax(teacher / temperature, dim=1)
    expected = temperature * (torch.softmax(student.detach() / temperature, dim=1) - p_teacher) / student.shape[0]
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)


def test_teacher_and_soft_labels_get_no_gradient():
    student = _random_logits(3, 4, 9).requires_grad_(True)
    teacher = _random_logits(3, 4, 10).requires_grad_(True)
    targets, counts = torch.tensor([0, 1, 3]), torch.tensor([10, 5, 3, 1])
    L.kd_loss(student, teacher, 2.0).backward()
    L.dive_loss(student, teacher, targets, counts, 3.0, 0.5, 0.5).backward()
    L.ssd_hybrid_loss(student, student, targets, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_kd_is_zero_when_student_matches_teacher_and_handles_underflowing_teacher():
    logits = _random_logits(3, 5, 11)
    assert L.kd_loss(logits, logits, 2.0).abs().item() < 1e-6
    # a teacher probability that underflows to 0 contributes 0 * log 0 = 0, not nan
    teacher = torch.tensor([[200.0, -200.0, 0.0]])
    loss = L.kd_loss(torch.zeros(1, 3), teacher, 1.0)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(math.log(3.0), rel=1e-6)  # KL(one-hot || uniform) = log 3


# ---- ClassificationLoss, DRW, validation, backends ------------------------------------------------


def test_classification_loss_dispatches_by_kind():
    cosine, targets, counts = _t([[0.125, -0.25, 0.75], [0.875, 0.375, -0.5]]), _y(), np.array(COUNTS)
    cpu = torch.device("cpu")
    assert ClassificationLoss(LossConfig(kind="ce"), counts, cpu)(cosine, targets).item() == pytest.approx(
        _ce(cosine.tolist(), TARGETS), rel=RTOL, abs=ATOL
    )
    assert ClassificationLoss(LossConfig(kind="bsce"), counts, cpu)(cosine, targets).item() == pytest.approx(
        _bsce(cosine.tolist(), TARGETS, COUNTS), rel=RTOL, abs=ATOL
    )
    ldam = ClassificationLoss(LossConfig(kind="ldam", ldam_max_margin=0.4, ldam_scale=10.0), counts, cpu)
    ldam.set_epoch(0)
    assert ldam(cosine, targets).item() == pytest.approx(_ldam(cosine.tolist(), TARGETS, COUNTS, 0.4, 10.0), rel=RTOL, abs=ATOL)


def test_effective_number_weights_hand_computed():
    counts, beta = np.array([100, 10, 1]), 0.99
    raw = [(1 - beta) / (1 - beta**n) for n in (100, 10, 1)]
    expected = [3 * r / sum(raw) for r in raw]
    np.testing.assert_allclose(effective_number_weights(counts, beta), expected, rtol=1e-12)


def test_drw_weights_switch_on_at_drw_epoch():
    counts = np.array(COUNTS)
    cosine, targets = _t([[0.125, -0.25, 0.75], [0.875, 0.375, -0.5]]), _y()
    loss = ClassificationLoss(LossConfig(kind="ldam", drw_epoch=160, drw_beta=0.99), counts, torch.device("cpu"))
    weights = effective_number_weights(counts, 0.99).tolist()
    unweighted = _ldam(cosine.tolist(), TARGETS, COUNTS, 0.5, 30.0)
    weighted = _ldam(cosine.tolist(), TARGETS, COUNTS, 0.5, 30.0, weights)
    assert abs(weighted - unweighted) > 1e-3
    for epoch, expected in ((0, unweighted), (159, unweighted), (160, weighted), (199, weighted)):
        loss.set_epoch(epoch)
        assert (loss.weights is None) == (epoch < 160)
        assert loss(cosine, targets).item() == pytest.approx(expected, rel=RTOL, abs=ATOL), epoch
    # a resumed run that goes back before the switch (set_epoch is called every epoch) turns it off
    loss.set_epoch(10)
    assert loss.weights is None


def test_drw_epoch_zero_never_reweights():
    loss = ClassificationLoss(LossConfig(kind="ldam", drw_epoch=0), np.array(COUNTS), torch.device("cpu"))
    loss.set_epoch(500)
    assert loss.weights is None


def test_drw_epoch_rejected_for_non_ldam_losses():
    with pytest.raises(ValueError, match="drw_epoch applies to loss.kind=ldam"):
        LossConfig(kind="bsce", drw_epoch=160)


@pytest.mark.parametrize("kind", ["bsce", "ldam"])
def test_prior_based_losses_reject_an_empty_class(kind):
    with pytest.raises(ValueError, match=rf"loss.kind={kind} needs every class to have training images; classes \[1, 3\]"):
        ClassificationLoss(LossConfig(kind=kind), np.array([5, 0, 3, 0]), torch.device("cpu"))


def test_ce_accepts_an_empty_class_without_warnings():
    # CE has no prior; a class with no training images is legal and must not produce inf/nan
    # weights (or numpy divide-by-zero warnings) that a later DRW switch could pick up.
    with np.errstate(all="raise"):
        loss = ClassificationLoss(LossConfig(kind="ce"), np.array([5, 0, 3]), torch.device("cpu"))
    loss.set_epoch(300)
    assert loss.weights is None
    assert torch.isfinite(loss(_t(STUDENT), torch.tensor([0, 2])))


def test_torch_backend_returns_the_references():
    losses = distillation_losses("torch", torch.device("cpu"))
    assert losses.kd is L.kd_loss
    assert losses.dive is L.dive_loss
    assert losses.ssd_hybrid is L.ssd_hybrid_loss


def test_fused_losses_fall_back_to_the_references_with_every_argument_in_place(monkeypatch):
    """Where the kernels cannot run (a CPU without the interpreter, meta tensors...), each fused
    loss calls its reference: with T != 1, p != 1, alpha != 1/2 and unequal weights, so an argument
    passed in the wrong place changes the loss or its gradient."""
    from ltscale.kernels import distill

    monkeypatch.setattr(distill, "_all_usable", lambda *tensors: False)
    generator = torch.Generator().manual_seed(0)
    student, teacher, hard = (torch.randn(5, 7, generator=generator) * 2 for _ in range(3))
    targets = torch.tensor([0, 6, 3, 3, 1])
    counts = torch.tensor([300, 120, 60, 30, 12, 6, 2])
    cases = [
        (distill.fused_kd_loss, L.kd_loss, (student, teacher), (3.0, 0.5)),
        (distill.fused_dive_loss, L.dive_loss, (student, teacher), (targets, counts, 3.0, 0.5, 0.3)),
        (distill.fused_ssd_hybrid_loss, L.ssd_hybrid_loss, (hard, student), (targets, teacher, 2.5, 0.7, 1.9)),
    ]
    for fused, reference, leaves, args in cases:
        results = []
        for fn in (fused, reference):
            inputs = [x.clone().requires_grad_(True) for x in leaves]
            loss = fn(*inputs, *args)
            loss.backward()
            results.append((loss.detach(), [x.grad for x in inputs]))
        (loss, grads), (loss_ref, grads_ref) = results
        torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
        for grad, grad_ref in zip(grads, grads_ref):
            torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)
    # The arguments matter at these values (a swap would not hide behind a symmetry).
    assert not torch.isclose(L.dive_loss(student, teacher, targets, counts, 0.5, 3.0, 0.3),
                             L.dive_loss(student, teacher, targets, counts, 3.0, 0.5, 0.3))
    assert not torch.isclose(L.ssd_hybrid_loss(hard, student, targets, teacher, 2.5, 1.9, 0.7),
                             L.ssd_hybrid_loss(hard, student, targets, teacher, 2.5, 0.7, 1.9))


def test_auto_backend_on_cpu_without_interpreter_falls_back_to_references(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    losses = distillation_losses("auto", torch.device("cpu"))
    assert (losses.kd, losses.dive, losses.ssd_hybrid) == (L.kd_loss, L.dive_loss, L.ssd_hybrid_loss)


def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"loss backend 'triton' needs a CUDA device \(or TRITON_INTERPRET=1 on CPU\)"):
        distillation_losses("triton", torch.device("cpu"))


@pytest.mark.parametrize("field,value,message", [
    ("drw_epoch", -3, "drw_epoch must be >= 0"),
    ("ldam_max_margin", 0.0, "ldam_max_margin must be a finite number > 0"),
    ("ldam_max_margin", float("nan"), "ldam_max_margin must be a finite number > 0"),
    ("ldam_scale", -1.0, "ldam_scale must be a finite number > 0"),
    ("ldam_scale", float("inf"), "ldam_scale must be a finite number > 0"),
    ("drw_beta", float("nan"), "drw_beta must be in"),
])
def test_loss_config_refuses_out_of_range_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(kind="ldam", **{field: value})


def test_moco_config_refuses_a_nan_temperature():
    from ltscale.models.moco import MoCoConfig

    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="moco.temperature must be a finite number > 0"):
            MoCoConfig(temperature=bad)


@pytest.mark.parametrize("kind", ["linear", "lws", "tau_norm"])
def test_classifier_logits_are_fp32_under_bf16_autocast(kind):
    """bf16 logits tie at the top among many classes, and top-k breaks ties by class index."""
    from ltscale.models.heads import HeadSpec, build_head

    torch.manual_seed(0)
    head = build_head(HeadSpec(kind, 100, tau=0.7), 64)
    if kind == "lws":
        head.scales.data.uniform_(0.5, 2.0)
    features = torch.randn(256, 64).bfloat16()  # a bf16 backbone's features
    expected = head(features.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(features)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_ldam_cosine_head_stays_fp32_under_bf16_autocast():
    """LDAM's s = 30 would magnify bf16's rounding of the cosines to the size of its margins."""
    from ltscale.models.heads import CosineHead

    torch.manual_seed(0)
    head = CosineHead(64, 10)
    features = torch.randn(32, 64)
    expected = F.normalize(features, dim=1) @ F.normalize(head.weight.detach(), dim=1).t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(features.bfloat16())  # a bf16 backbone's features
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.normalize(features.bfloat16().float(), dim=1) @ F.normalize(head.weight.detach(), dim=1).t())
    assert (30 * (got - expected)).abs().max() < 0.05  # only the features' own bf16 rounding is left
