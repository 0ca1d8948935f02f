"""The promotion gate and the partial-label loss, on small arrays: the rules, one at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from hpcseg.errors import DatasetError
from hpcseg.gate import decide, dice_per_label, format_rows
from hpcseg.partial import label_value_map, partial_label_loss

LABELS = {"body": 1, "lungs": 2, "bone": 3, "liver": 4}


def scores(**dice):
    return {k: {"dice": v, "n": 0 if v is None else 3} for k, v in dice.items()}


def test_a_label_empty_in_truth_and_prediction_is_left_out_not_counted_as_one():
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[:2] = 1
    pred = truth.copy()
    pred[0, 0, 0] = 0
    d = dice_per_label(pred, truth, LABELS)
    assert d["liver"] is None and d["lungs"] is None and 0.9 < d["body"] < 1.0
    pred[3, 3, 3] = 4  # predicted but not there: scored, and 0
    assert dice_per_label(pred, truth, LABELS)["liver"] == 0.0
    assert dice_per_label(pred, truth, LABELS, annotated=["body"])["liver"] is None  # not annotated: no evidence


def test_the_gate_compares_each_label_on_both_sets_not_the_mean():
    before = {"reference": scores(body=0.98, liver=0.95), "validation": scores(body=0.90, liver=None)}
    # the mean goes up (0.965 -> 0.975) but liver drops 0.05 on the reference set: refused, naming it
    after = {"reference": scores(body=0.999, liver=0.90), "validation": scores(body=0.99, liver=None)}
    d = decide(before, after, n_val=3)
    assert not d.promoted and len(d.reasons) == 1 and "liver on the reference set" in d.reasons[0]
    assert [r["label"] for r in d.rows if r["dropped"]] == ["liver"]
    within = {"reference": scores(body=0.97, liver=0.94), "validation": scores(body=0.89, liver=None)}
    assert decide(before, within, n_val=3, tolerance=0.02).promoted
    assert not decide(before, within, n_val=3, tolerance=0.005).promoted
    lines = list(format_rows(d.rows))
    assert lines[1].startswith("reference  liver        0.9500 -> 0.9000 (-0.0500) n=3  DROP")


def test_a_label_no_longer_found_counts_as_a_drop_to_zero():
    d = decide({"reference": scores(liver=0.95)}, {"reference": scores(liver=None)}, n_val=5)
    assert not d.promoted and "liver" in d.reasons[0]


def test_fewer_than_three_validation_cases_warns_and_needs_force():
    same = {"reference": scores(body=0.98), "validation": scores(body=0.9)}
    d = decide(same, same, n_val=1)
    assert not d.promoted and "only 1 validation case" in d.warnings[0] and "--force" in d.reasons[0]
    forced = decide(same, same, n_val=1, force=True)
    assert forced.promoted and forced.forced and forced.warnings and forced.reasons[0].startswith("forced despite")
    assert decide(same, same, n_val=3).promoted


def test_with_every_label_annotated_the_loss_is_monais_dice_ce():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, 8, 6)
    target = torch.randint(0, 5, (2, 1, 8, 8, 6))
    ann = torch.ones(2, 5, dtype=torch.bool)
    ours = partial_label_loss(logits, target, ann)
    theirs = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_a_left_out_label_is_not_taught_as_background():
    """Where a case does not annotate liver, predicting liver on its 0 voxels costs nothing (masked) or a lot."""
    target = torch.zeros(1, 1, 6, 6, 6, dtype=torch.long)
    target[0, 0, :3] = 1  # body annotated; the rest 0: background or liver, the case does not say
    says_background = torch.full((1, 5, 6, 6, 6), -8.0)
    says_background[0, 1, :3] = 8.0
    says_liver = says_background.clone()
    says_background[0, 0, 3:] = 8.0
    says_liver[0, 4, 3:] = 8.0  # the network says liver there
    ann = torch.tensor([[True, True, True, True, False]])
    assert partial_label_loss(says_liver, target, ann).item() == pytest.approx(
        partial_label_loss(says_background, target, ann).item(), abs=1e-4)
    unmasked = partial_label_loss(says_liver, target, ann, masked=False).item()
    assert unmasked > partial_label_loss(says_background, target, ann, masked=False).item() + 1.0
    grads = []
    for masked in (True, False):
        lg = says_liver.clone().requires_grad_()
        partial_label_loss(lg, target, ann, masked=masked).backward()
        grads.append(lg.grad[0, 4, 3:])
    assert grads[0].max() <= 0  # masked: nothing pushes liver's logit down where liver is not annotated
    assert grads[1].min() > 5 * grads[0].abs().max()  # unmasked: a push towards background


def test_label_sets_must_match_or_be_mapped():
    assert label_value_map({"liver": 1}, LABELS) == ({1: 4}, {"liver": "liver"})  # same name: value remapped
    with pytest.raises(DatasetError, match=r"labels \['tumour'\] are not the model's") as err:
        label_value_map({"liver": 4, "tumour": 5}, LABELS)
    assert "--label-map tumour=" in err.value.hint
    assert label_value_map({"liver": 4, "tumour": 5}, LABELS, {"tumour": "bone"})[0] == {4: 4, 5: 3}
    with pytest.raises(DatasetError, match="has no label"):
        label_value_map({"tumour": 5}, LABELS, {"tumour": "spleen"})
    with pytest.raises(DatasetError, match="two dataset labels"):
        label_value_map({"liver": 4, "tumour": 5}, LABELS, {"tumour": "liver"})
