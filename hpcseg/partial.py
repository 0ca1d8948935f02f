"""Partial labels: which labels each case annotates, how a dataset's labels map onto a model's, and a loss that
learns nothing about what a case does not annotate.

Why: corrected masks are often partial (one organ fixed, the rest left out). Trained as if complete, every
structure a mask leaves out is taught as background and the model forgets it. So each case carries the label
names its mask *annotates*; a label annotated but absent from the mask is "annotated as absent" (real
background), a label not annotated is unknown there.

The loss (:func:`partial_label_loss`, the marginal loss of Shi et al., MedIA 2021): for a case that does not
annotate some labels, their probabilities are merged into background before Dice + cross-entropy, so a voxel
marked 0 may be background *or* any label the case leaves out, and predicting a left-out label there costs
nothing. With every label annotated and present it is exactly MONAI's ``DiceCELoss(to_onehot_y=True,
softmax=True)``; the Dice term averages over the channels present in the case's truth (a crop without the liver
says nothing about the liver's overlap; cross-entropy still punishes stray liver voxels).
``masked=False`` (a test-only switch: the ablation the promotion gate must catch) treats every case as fully
annotated.

Label sets (:func:`label_value_map`): a dataset's label names must be the model's (same name: values remapped
if they differ) or be mapped explicitly (``{"tumour": "liver"}``); any other name is refused, naming it.
"""

from __future__ import annotations

from typing import Any

from hpcseg.errors import DatasetError


def label_value_map(dataset_labels: dict[str, int], model_labels: dict[str, int],
                    mapping: dict[str, str] | None = None) -> tuple[dict[int, int], dict[str, str]]:
    """(dataset value → model value, dataset name → model name); DatasetError for a name the model lacks."""
    mapping = dict(mapping or {})
    bad_targets = {k: v for k, v in mapping.items() if v not in model_labels}
    if bad_targets:
        raise DatasetError(f"--label-map {bad_targets}: the model has no label {sorted(bad_targets.values())}",
                           hint=f"the model's labels are {', '.join(model_labels)}")
    unknown = [k for k in mapping if k not in dataset_labels]
    if unknown:
        raise DatasetError(f"--label-map names {unknown}, which the dataset does not have",
                           hint=f"the dataset's labels are {', '.join(dataset_labels)}")
    names = {k: mapping.get(k, k) for k in dataset_labels}
    missing = sorted(k for k, v in names.items() if v not in model_labels)
    if missing:
        raise DatasetError(f"the dataset's labels {missing} are not the model's ({', '.join(model_labels)})",
                           hint="say which model label each is, e.g. --label-map " + ",".join(
                               f"{k}={next(iter(model_labels))}" for k in missing))
    targets = list(names.values())
    twice = sorted({t for t in targets if targets.count(t) > 1})
    if twice:
        raise DatasetError(f"two dataset labels map to the model's {twice}", hint="map each onto its own label")
    return {dataset_labels[k]: model_labels[v] for k, v in names.items()}, names


def annotated_values(case: dict[str, Any], names: dict[str, str], model_labels: dict[str, int]) -> list[int]:
    """Model label values the case annotates: its ``annotated`` names (default: every dataset label), mapped."""
    ann = case.get("annotated")
    dataset_names = list(names) if ann is None else [a for a in ann if a in names]
    return sorted(model_labels[names[a]] for a in dataset_names)


def partial_label_loss(logits: Any, target: Any, annotated: Any, masked: bool = True) -> Any:
    """Dice + cross-entropy with left-out labels merged into background, per case; mean over the batch.

    ``logits`` (B, C, ...) raw network output, ``target`` (B, 1, ...) integer model label values, ``annotated``
    (B, C) bool: which channels each case annotates (channel 0, background, is always kept).
    """
    import torch
    import torch.nn.functional as F

    total = logits.new_zeros(())
    n_ch = logits.shape[1]
    for b in range(logits.shape[0]):
        ann = annotated[b].clone() if masked else torch.ones(n_ch, dtype=torch.bool, device=logits.device)
        ann[0] = True
        kept = torch.nonzero(ann).flatten()
        left_out = torch.nonzero(~ann).flatten()
        lg = logits[b]
        if len(left_out):  # background's logit becomes log(exp(bg) + sum exp(left-out)): their probabilities add
            bg = torch.logsumexp(torch.cat([lg[:1], lg[left_out]]), dim=0, keepdim=True)
            merged = torch.cat([bg, lg[kept[1:]]])
        else:
            merged = lg
        lut = torch.zeros(n_ch, dtype=torch.long, device=logits.device)
        lut[kept] = torch.arange(len(kept), device=logits.device)
        t = lut[target[b, 0].long()]  # a left-out value in the mask (it should not be there) counts as background
        logp = F.log_softmax(merged, dim=0)
        ce = F.nll_loss(logp[None], t[None])
        prob = logp.exp()
        onehot = F.one_hot(t, len(kept)).movedim(-1, 0).to(prob.dtype)
        dims = tuple(range(1, prob.ndim))
        inter = (prob * onehot).sum(dims)
        truth = onehot.sum(dims)
        denom = prob.sum(dims) + truth
        # Dice over the channels present in this case's truth: a random crop without the liver would otherwise
        # score 1 - 0/(sum of liver probabilities) ≈ 1 however little liver is predicted, and push the liver
        # down everywhere (cross-entropy alone then says how wrong a stray liver voxel is)
        present = truth > 0
        present[0] = True
        dice = 1.0 - ((2.0 * inter[present] + 1e-5) / (denom[present] + 1e-5)).mean()
        total = total + ce + dice
    return total / logits.shape[0]
