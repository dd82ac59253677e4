"""TRL's fused output head on the CPU: only the labelled positions are scored
(`caiflow.training.common.score_labelled_positions_only`), with the same log-probabilities, loss and
gradients as scoring every position."""

from __future__ import annotations

import pytest
import torch
import trl.trainer.utils as trl_utils

from caiflow.models import load_causal_lm
from caiflow.training.common import score_labelled_positions_only


@pytest.fixture
def switch_restored():
    yield
    score_labelled_positions_only(True)  # what the training entry points leave in place


def _fused_model(tiny_path):
    model = load_causal_lm(tiny_path, device="cpu", dtype="float32")
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    return model


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding
    mask[2, :11] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :14] = -100  # a prompt: only the last 6 positions carry a label
    return ids, mask, labels


@pytest.fixture
def head_rows(monkeypatch) -> list[int]:
    """The rows of every call into TRL's chunked output head during the test."""
    rows: list[int] = []
    apply = trl_utils._ChunkedLogProbFunction.apply

    def counting(hidden, *args):
        rows.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting)
    return rows


def _run(model, ids, mask, labels):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_labelled_positions_only_same_values_fewer_rows(tiny_path, switch_restored, head_rows):
    model = _fused_model(tiny_path)
    ids, mask, labels = _batch(model.config.vocab_size)
    labelled = int((labels[:, 1:] != -100).sum())  # shifted: position t predicts token t+1

    assert score_labelled_positions_only(False) is False
    full, full_grads = _run(model, ids, mask, labels)
    every = list(head_rows)
    head_rows.clear()
    assert score_labelled_positions_only(True) is True
    compact, compact_grads = _run(model, ids, mask, labels)
    only = list(head_rows)

    assert every == [3 * 19] and only == [labelled] and labelled < 3 * 19
    keep = labels[:, 1:] != -100
    assert torch.allclose(compact.log_probs[keep], full.log_probs[keep], atol=1e-6)
    assert torch.all(compact.log_probs[~keep] == 0) and torch.all(full.log_probs[~keep] == 0)
    assert torch.allclose(compact.entropy[keep], full.entropy[keep], atol=1e-6)
    assert torch.allclose(compact.loss, full.loss, atol=1e-6)
    assert compact_grads.keys() == full_grads.keys() and compact_grads
    for name, grad in full_grads.items():
        assert torch.allclose(compact_grads[name], grad, atol=1e-6), name


def test_the_switch_leaves_accelerators_to_trl(switch_restored):
    score_labelled_positions_only(True)
    score_labelled_positions_only(True)  # twice: still one layer over TRL's own decision
    original = trl_utils._use_triton._caiflow_original
    assert trl_utils._use_triton(torch.device("cpu")) is True
    assert trl_utils._use_triton(torch.device("cuda")) == original(torch.device("cuda"))
    score_labelled_positions_only(False)
    assert trl_utils._use_triton is original


def test_training_benchmark_times_both_ways_of_scoring(default_model_store, switch_restored, head_rows):
    """benchmarks/training.py --variants fp32,all-positions on the default model: the all-positions run
    sends more rows through the head than the default one, and the switch is back in place after it."""
    from benchmark_scripts import benchmark_module

    training = benchmark_module("training")
    out = training.main(
        ["--storage", str(default_model_store), "--rows", "8", "--variants", "fp32,all-positions"]
    )
    rows = head_rows
    assert set(out) == {"fp32", "all-positions"} and all(s > 0 for s in out.values())
    assert len(rows) == 4  # one step of 8 rows in per-device slices of 4, per variant
    assert sum(rows[2:]) > 2 * sum(rows[:2]) > 0  # the prompt and padding too: over twice the rows
    assert trl_utils._use_triton(torch.device("cpu")) is True
