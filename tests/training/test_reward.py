"""Reward model: the soft-label loss, ensemble aggregation, training on the tiny model, saved members
and scoring."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

import caiflow.training.reward as reward
from caiflow.cpu_kernels import cpu_kernels
from caiflow.faults import OOM_ABOVE_ENV as FAULT_ENV
from caiflow.training.config import RewardModelConfig
from caiflow.training.reward import soft_label_loss, train_reward_model
from caiflow.training.reward_data import assign_principles, split_pairs
from caiflow.training.reward_scorer import RewardScorer, aggregate, conversation_ids, pair_metrics, score_ids
from tests.benchmark_scripts import run_benchmark

FAST = dict(
    max_steps=2,
    batch_size=4,
    per_device_batch_size=2,
    max_length=128,
    learning_rate=1e-2,
    save_steps=1,
    logging_steps=1,
    eval_fraction=0.25,
    lora={"r": 4, "alpha": 8},
)


# ---------------------------------------------------------------- loss, aggregation, metrics


def test_soft_label_loss_matches_a_hand_computed_value():
    r_chosen, r_rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    label = torch.tensor([0.8, 0.3])
    # margins 1 and -2; log sigmoid(1) = -0.31326169, log sigmoid(-1) = -1.31326169,
    # log sigmoid(-2) = -2.12692801, log sigmoid(2) = -0.12692801
    first = -(0.8 * -0.31326169 + 0.2 * -1.31326169)  # 0.51326169
    second = -(0.3 * -2.12692801 + 0.7 * -0.12692801)  # 0.72692801
    assert soft_label_loss(r_chosen, r_rejected, label).item() == pytest.approx(
        (first + second) / 2, abs=1e-6
    )
    assert (first + second) / 2 == pytest.approx(0.62009485, abs=1e-7)


def test_label_one_is_the_usual_bradley_terry_loss_and_large_margins_stay_finite():
    r_chosen, r_rejected = torch.tensor([0.3, -1.2, 4.0]), torch.tensor([0.1, 0.5, -2.0])
    hard = -torch.nn.functional.logsigmoid(r_chosen - r_rejected).mean()
    assert torch.allclose(soft_label_loss(r_chosen, r_rejected, torch.ones(3)), hard)
    big = soft_label_loss(torch.tensor([1000.0]), torch.tensor([0.0]), torch.tensor([0.0]))
    assert math.isfinite(big.item()) and big.item() == pytest.approx(1000.0)


def test_pair_weights_scale_each_term_and_balance_the_kinds(tiny_path, prefs):
    from caiflow.models import load_tokenizer
    from caiflow.training.reward_data import pairs_to_rows

    r_chosen, r_rejected, label = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([0.8, 0.3])
    each = [
        soft_label_loss(r_chosen[i : i + 1], r_rejected[i : i + 1], label[i : i + 1]).item() for i in (0, 1)
    ]
    weighted = soft_label_loss(r_chosen, r_rejected, label, torch.tensor([1.5, 0.5])).item()
    assert weighted == pytest.approx((1.5 * each[0] + 0.5 * each[1]) / 2, abs=1e-6)
    assert soft_label_loss(r_chosen, r_rejected, label, torch.ones(2)).item() == pytest.approx(sum(each) / 2)

    pairs = prefs.head(8).assign(pair_kind=["contrastive-benign"] * 6 + ["contrastive-red-team"] * 2)
    tok = load_tokenizer(tiny_path)
    plain = [r["weight"] for r in pairs_to_rows(pairs, tok)]
    balanced = np.array([r["weight"] for r in pairs_to_rows(pairs, tok, balance_kinds=True)])
    assert plain == [1.0] * 8
    # 6 benign pairs weigh 8 / (2 * 6) each, 2 red-team pairs 8 / (2 * 2): 4 and 4 in total, mean 1
    assert balanced[:6] == pytest.approx([2 / 3] * 6) and balanced[6:] == pytest.approx([2.0, 2.0])
    assert balanced.mean() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no pair_kind column"):
        pairs_to_rows(pairs.drop(columns="pair_kind"), tok, balance_kinds=True)


def test_aggregate_is_mean_minus_lambda_std():
    scores = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])  # mean 2, 2, 2; std (ddof 0) 1, 0, 1
    assert aggregate(scores, 0.5) == pytest.approx([1.5, 2.0, 1.5])
    assert aggregate(scores, 0.0) == pytest.approx([2.0, 2.0, 2.0])
    assert aggregate(np.array([[0.1, -0.4]]), 3.0) == pytest.approx([0.1, -0.4])  # one member: its scores
    with pytest.raises(ValueError, match="shape"):
        aggregate(np.array([1.0, 2.0]), 0.5)


def test_pair_metrics_by_hand():
    m = pair_metrics(np.array([0.0, 0.0]), np.array([1.0, 0.0]))  # p = 0.5 for both
    assert m["brier"] == pytest.approx(0.25) and m["soft_agreement"] == pytest.approx(0.5)
    assert m["ece"] == pytest.approx(0.0)  # one bin: mean p 0.5, mean label 0.5
    assert m["accuracy"] == pytest.approx(0.5)  # margin 0 is never "> 0": right on the second pair only
    assert m["loss"] == pytest.approx(math.log(2))
    assert pair_metrics(np.array([]), np.array([]))["accuracy"] is None


def test_principles_are_assigned_round_robin():
    assert assign_principles(["b", "a", "c", "a"], 2) == [["a", "c"], ["b"]]
    with pytest.raises(ValueError, match="ensemble_mode: seeds"):
        assign_principles(["a", "b"], 3)


# ---------------------------------------------------------------- training an ensemble of two


@pytest.fixture(scope="module")
def ensemble(tiny_path, shared_prefs, spy_installer, tmp_path_factory):
    """Two members (seeds mode) trained for two steps, watched by a weight spy."""
    root = tmp_path_factory.mktemp("ensemble")
    with pytest.MonkeyPatch.context() as mp:
        spy = spy_installer(mp, reward)
        metrics = train_reward_model(
            RewardModelConfig(ensemble_size=2, **FAST),
            tiny_path,
            shared_prefs,
            root / "model",
            root / "work",
            seed=0,
            card_extra={"preferences": "test"},
        )
    return root / "model", metrics, spy, shared_prefs


def test_members_move_adapters_and_head_not_base(ensemble):
    _, _, spy, _ = ensemble
    assert len(spy.finished()) == 2
    for run in (0, 1):
        changed = spy.changed(run)
        assert spy.lora_names(run) <= changed
        assert any("score" in n and "modules_to_save" in n for n in changed), "the score head must train"
        assert not (spy.base_names(run) & changed), "base weights (and the original head) must stay frozen"


def test_ensemble_layout_metrics_and_loading(ensemble, tiny_path):
    from transformers import AutoModelForSequenceClassification

    out, metrics, _, prefs = ensemble
    spec = json.loads((out / "ensemble.json").read_text())
    assert spec["members"] == ["member-00", "member-01"] and spec["lambda"] == 0.5 and spec["mode"] == "seeds"
    assert spec["seeds"] == [0, 1] and len(spec["offsets"]) == 2
    assert (out / "README.md").is_file() and (out / "tokenizer_config.json").is_file()

    assert metrics["pairs"] == 20 and metrics["eval_pairs"] == 5 and metrics["train_pairs"] == 15
    json.dumps(metrics)  # goes into the artifact manifest as it is
    # The held-out metrics are those of the saved ensemble on the held-out pairs, recomputed here
    # from scratch.
    _, held_out = split_pairs(prefs, FAST["eval_fraction"], seed=0)
    scorer = RewardScorer(out)
    chosen = scorer.score(list(held_out["prompt"]), [list(c) for c in held_out["chosen"]])
    rejected = scorer.score(list(held_out["prompt"]), [list(r) for r in held_out["rejected"]])
    again = pair_metrics(chosen - rejected, held_out["label"].to_numpy())
    for key in ("accuracy", "soft_agreement", "brier", "ece", "loss"):
        assert metrics[f"eval_{key}"] == pytest.approx(again[key], abs=1e-4), key
    assert [m["name"] for m in metrics["members"]] == ["member-00", "member-01"]
    assert all(m["steps"] == 2 and "eval" in m for m in metrics["members"])

    base = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1)
    for name in spec["members"]:
        model = AutoModelForSequenceClassification.from_pretrained(out / name)  # LoRA merged: loads directly
        assert model.config.num_labels == 1 and model.config.pad_token_id is not None
        assert not torch.equal(
            model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight
        )


def test_scorer_gives_member_and_aggregated_scores(ensemble):
    out, _, _, prefs = ensemble
    prompts = list(prefs["prompt"][:5])
    answers = [
        "No.",
        "I won't help with hurting anyone, but I can talk about staying safe.",
        "Sure",
        "Here:",
        "?",
    ]
    scorer = RewardScorer(out, batch_size=2)
    members = scorer.score_members(prompts, answers)
    assert members.shape == (2, 5)
    assert scorer.score(prompts, answers) == pytest.approx(aggregate(members, 0.5))
    assert RewardScorer(out, lam=0.0).score(prompts, answers) == pytest.approx(members.mean(axis=0), abs=1e-6)

    # Padding must not change a score: batched (mixed lengths) equals one at a time, equals an
    # unpadded forward.
    one_by_one = RewardScorer(out, batch_size=1).score_members(prompts, answers)
    assert members == pytest.approx(one_by_one, abs=1e-5)
    ids = conversation_ids(scorer.tokenizer, prompts[1], answers[1])
    # in the precision the member trained in (bfloat16 products under bf16 autocast: `auto` where it pays)
    low = getattr(torch, scorer.products) if scorer.products else None
    with torch.inference_mode(), cpu_kernels(scorer.models[0], products=low):
        raw = scorer.models[0](input_ids=torch.tensor([ids])).logits[0, 0].item()
    # bfloat16 products end in a bfloat16 score (8 significant bits): one step of it apart at most
    tol = 1e-5 if low is None else 2**-7 * abs(raw)
    assert members[0, 1] == pytest.approx(raw - scorer.offsets[0], abs=tol)
    with pytest.raises(ValueError, match="one completion per prompt"):
        scorer.score(prompts, answers[:2])


def test_scoring_runs_the_shared_prefix_once_with_the_same_rewards(ensemble, monkeypatch):
    """The chat template's preamble every sequence shares runs once per call; rewards stay those of whole
    sequences (right padding after the prefix, positions continuing it), and nothing is shared without a
    common head."""
    from caiflow.decoding import common_prefix

    out, _, _, prefs = ensemble
    scorer = RewardScorer(out, batch_size=2)
    prompts = list(prefs["prompt"][:5])
    ids = scorer.encode(prompts, ["No.", "Sure, here is how: first you", "?", "I can't help.", "Fine"])
    model, pad = scorer.models[0], scorer.models[0].config.pad_token_id
    assert common_prefix(ids) >= 16
    seen = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True
    )
    shared = score_ids(model, ids, pad, batch_size=2)
    assert seen[0] == (1, common_prefix(ids)) and len(seen) == 1 + 3  # the prefix, then 3 batches of suffixes
    assert all(shape[1] < max(map(len, ids)) for shape in seen[1:])
    seen.clear()
    whole = score_ids(model, ids, pad, batch_size=2, prefix_min_tokens=None)
    assert len(seen) == 3 and shared == pytest.approx(whole, abs=1e-5)
    seen.clear()
    score_ids(model, [[7, 8, 9] + i for i in ids[:2]] + [[5] + ids[2]], pad, batch_size=2)
    assert len(seen) == 2  # no common head: no prefix run
    hook.remove()


def test_scorer_formats_like_trl_reward_trainer(ensemble):
    """Our token ids for prompt + answer are the ones TRL's RewardTrainer would build from the same pair."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    out, _, _, prefs = ensemble
    scorer = RewardScorer(out)
    row = {
        "prompt": list(prefs["prompt"][0]),
        "chosen": list(prefs["chosen"][0]),
        "rejected": list(prefs["rejected"][0]),
    }
    args = RewardConfig(
        output_dir=str(out.parent / "trl"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
    )
    trl_ids = RewardTrainer._prepare_dataset(None, Dataset.from_list([row]), scorer.tokenizer, args, "x")[0]
    assert trl_ids["chosen_ids"] == conversation_ids(
        scorer.tokenizer, row["prompt"], row["chosen"][0]["content"]
    )


def test_principles_ensemble_and_out_of_memory_back_off(tiny_path, prefs, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "1")  # per-device batches above 1 run out of memory
    cfg = RewardModelConfig(ensemble_size=2, ensemble_mode="principles", **{**FAST, "max_steps": 1})
    metrics = train_reward_model(cfg, tiny_path, prefs, tmp_path / "model", tmp_path / "work", seed=3)
    spec = json.loads((tmp_path / "model" / "ensemble.json").read_text())
    assert spec["principles"] == {"member-00": ["harmless"], "member-01": ["honest"]}
    assert sum(m["train_pairs"] for m in metrics["members"]) == metrics["train_pairs"]
    assert all(
        m["backoffs"] == 1 and m["per_device_batch_size"] == 1 and m["gradient_accumulation_steps"] == 4
        for m in metrics["members"]
    )
    assert metrics["backoffs"] == 2 and metrics["per_device_batch_size"] == 1

    # A rerun reuses finished members instead of training them again.
    again = train_reward_model(cfg, tiny_path, prefs, tmp_path / "model", tmp_path / "work", seed=3)
    assert [m["offset"] for m in again["members"]] == [m["offset"] for m in metrics["members"]]


def test_balanced_kinds_reach_the_trainers_loss(tiny_path, prefs, tmp_path, monkeypatch):
    seen = []

    def spy(r_chosen, r_rejected, label, weight=None):
        seen.append(weight.tolist())
        return soft_label_loss(r_chosen, r_rejected, label, weight)

    monkeypatch.setattr(reward, "soft_label_loss", spy)
    kinds = prefs.assign(pair_kind=["contrastive-benign"] * 15 + ["contrastive-red-team"] * 5)
    cfg = RewardModelConfig(balance_kinds=True, **{**FAST, "max_steps": 2, "eval_fraction": 0.0})
    train_reward_model(cfg, tiny_path, kinds, tmp_path / "model", tmp_path / "work", seed=0)
    weights = sorted({round(w, 4) for batch in seen for w in batch})
    assert weights and set(weights) <= {round(20 / 30, 4), 2.0}  # 20 / (2 * 15) and 20 / (2 * 5)


def test_full_method_trains_every_weight(tiny_path, prefs, tmp_path, spy_on):
    from transformers import AutoModelForSequenceClassification

    spy = spy_on(reward)
    cfg = RewardModelConfig(
        method="full", **{**FAST, "max_steps": 1, "eval_fraction": 0.0, "learning_rate": 1e-3}
    )
    metrics = train_reward_model(cfg, tiny_path, prefs, tmp_path / "model", tmp_path / "work", seed=0)
    assert metrics["eval_accuracy"] is None and metrics["eval_pairs"] == 0  # nothing held out
    assert not spy.lora_names() and spy.base_names() <= spy.changed()
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model" / "member-00")
    assert RewardScorer(tmp_path / "model").score(list(prefs["prompt"][:2]), ["a", "b"]).shape == (2,)
    assert model.config.pad_token_id is not None


def test_bad_preferences_say_what_to_fix(tiny_path, prefs, tmp_path):
    cfg = RewardModelConfig(**FAST)
    with pytest.raises(ValueError, match="lack column"):
        train_reward_model(
            cfg, tiny_path, prefs.drop(columns=["label"]), tmp_path / "m", tmp_path / "w", seed=0
        )
    bad = prefs.assign(label=[1.5] + [0.9] * (len(prefs) - 1))
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
        train_reward_model(cfg, tiny_path, bad, tmp_path / "m", tmp_path / "w", seed=0)
    with pytest.raises(ValueError, match="max_length"):
        train_reward_model(
            RewardModelConfig(**{**FAST, "max_length": 8}),
            tiny_path,
            prefs,
            tmp_path / "m",
            tmp_path / "w",
            seed=0,
        )
    with pytest.raises(ValueError, match="ensemble_mode: seeds"):
        train_reward_model(
            RewardModelConfig(ensemble_size=3, ensemble_mode="principles", **FAST),
            tiny_path,
            prefs,
            tmp_path / "m",
            tmp_path / "w",
            seed=0,
        )


def test_a_member_trained_under_bf16_autocast_is_scored_in_bfloat16_products(tiny_path, prefs, tmp_path):
    """reward_model.bf16_autocast on: ensemble.json records `products: bfloat16` and every scorer of the
    folder multiplies its linear layers in bfloat16 (the CPU kernels' packed copies, or autocast without
    them), close to float32 but not equal; off: no record, float32 products."""
    for name, bf16 in (("a", True), ("b", False)):
        cfg = RewardModelConfig(**{**FAST, "eval_fraction": 0.0, "bf16_autocast": bf16})
        train_reward_model(cfg, tiny_path, prefs, tmp_path / name, tmp_path / f"w{name}", seed=0)
    assert json.loads((tmp_path / "a" / "ensemble.json").read_text())["products"] == "bfloat16"
    assert "products" not in json.loads((tmp_path / "b" / "ensemble.json").read_text())
    prompts, answers = list(prefs["prompt"][:8]), [c[0]["content"] for c in prefs["chosen"][:8]]
    bf16, fp32 = RewardScorer(tmp_path / "a"), RewardScorer(tmp_path / "b")
    assert (bf16.products, fp32.products) == ("bfloat16", None)
    assert RewardScorer(tmp_path / "a", dtype="bfloat16").products is None  # 16-bit weights: nothing to add
    model, ids = bf16.models[0], bf16.encode(prompts, answers)
    pad = model.config.pad_token_id
    packed, full, autocast = (
        score_ids(model, ids, pad, products=p, fast_cpu=fast)
        for p, fast in (("bfloat16", True), (None, True), ("bfloat16", False))
    )
    np.testing.assert_allclose(bf16.score_members(prompts, answers)[0] + bf16.offsets[0], packed)
    spread = np.ptp(full)
    for low in (packed, autocast):  # without the CPU kernels, autocast multiplies in bfloat16
        moved = np.abs(low - full)
        assert 0 < moved.max() < 0.1 * spread
    np.testing.assert_allclose(packed, autocast, atol=0.1 * spread)


def test_per_device_batch_does_not_change_the_reward_model(tiny_path, prefs, tmp_path):
    """reward_model.per_device_batch_size is not fingerprinted: accumulation gives the same scores
    (dropout off; with LoRA dropout on, its masks are drawn per forward pass and differ too). In float32:
    under bf16 autocast (`bf16_autocast: auto` on a CPU where it pays) they agree to bfloat16 rounding."""
    settings = {
        **FAST,
        "eval_fraction": 0.0,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "bf16_autocast": False,
    }
    train_reward_model(
        RewardModelConfig(**settings), tiny_path, prefs, tmp_path / "a", tmp_path / "wa", seed=0
    )
    train_reward_model(
        RewardModelConfig(**{**settings, "per_device_batch_size": 1}),
        tiny_path,
        prefs,
        tmp_path / "b",
        tmp_path / "wb",
        seed=0,
    )
    prompts, answers = list(prefs["prompt"][:6]), [c[0]["content"] for c in prefs["rejected"][:6]]
    a = RewardScorer(tmp_path / "a").score_members(prompts, answers)
    b = RewardScorer(tmp_path / "b").score_members(prompts, answers)
    assert a == pytest.approx(b, abs=1e-4)
    train_reward_model(
        RewardModelConfig(**settings), tiny_path, prefs, tmp_path / "c", tmp_path / "wc", seed=1
    )
    other_seed = RewardScorer(tmp_path / "c").score_members(prompts, answers)
    assert np.abs(other_seed - a).max() > 1e-3  # the comparison can tell two different models apart


def test_held_out_accuracy_carries_an_interval_per_pair_kind():
    from caiflow.training.reward import accuracy_intervals

    margins = np.array([1.0, -1.0, 2.0, 0.5, -0.5, 1.0])
    labels = np.array([0.9, 0.9, 0.8, 0.5, 0.2, 0.1])
    kinds = pd.Series(
        ["feedback", "feedback", "contrastive-red-team", "feedback", "contrastive-benign", "feedback"]
    )
    out = accuracy_intervals(margins, labels, kinds)
    assert (
        out["eval_accuracy_lo"] < 3 / 5 < out["eval_accuracy_hi"]
    )  # 3 right of 5 decided (label 0.5 left out)
    by_kind = out["eval_accuracy_by_kind"]
    assert by_kind["feedback"]["pairs"] == 3 and by_kind["feedback"]["accuracy"] == pytest.approx(1 / 3)
    assert (
        by_kind["contrastive-red-team"]["accuracy"] == 1.0
        and by_kind["contrastive-benign"]["accuracy"] == 1.0
    )
    assert by_kind["contrastive-benign"]["lo"] < 0.5  # one pair proves little
    assert "eval_accuracy_by_kind" not in accuracy_intervals(margins, labels, None)


def test_qlora_members_are_adapters_on_one_shared_4bit_backbone(tiny64_path, prefs, tmp_path, spy_on):
    """The 7B preset's layout: members trained on a 4-bit backbone, kept as adapters, scored on one
    backbone by switching adapters."""
    spy = spy_on(reward)
    out = tmp_path / "model"
    cfg = RewardModelConfig(ensemble_size=2, method="qlora", shared_backbone=True, **FAST)
    metrics = train_reward_model(cfg, tiny64_path, prefs, out, tmp_path / "work", seed=0)
    for run in (0, 1):
        assert spy.lora_names(run) <= spy.changed(run) and not (spy.base_names(run) & spy.changed(run))
    spec = json.loads((out / "ensemble.json").read_text())
    assert spec["layout"] == "adapters" and spec["quantized"] and spec["backbone"] == str(tiny64_path)
    for name in spec["members"]:  # an adapter and its score head, no full weights
        assert (out / name / "adapter_config.json").is_file() and not (out / name / "config.json").exists()

    scorer = RewardScorer(out)
    assert scorer.size == 2 and len(scorer.models) == 1  # one backbone in memory
    assert any(type(m).__name__ == "Linear4bit" for m in scorer.models[0].modules())
    _, held_out = split_pairs(prefs, FAST["eval_fraction"], seed=0)
    prompts = list(held_out["prompt"])
    members = scorer.score_members(prompts, [list(c) for c in held_out["chosen"]])
    assert not np.allclose(members[0], members[1])  # switching adapters switches members
    # the held-out metrics of training are the shared-backbone scorer's (to bf16 rounding: TRL
    # trains 4-bit models' adapters in bf16, peft loads them back as fp32)
    chosen = scorer.score(prompts, [list(c) for c in held_out["chosen"]])
    rejected = scorer.score(prompts, [list(r) for r in held_out["rejected"]])
    again = pair_metrics(chosen - rejected, held_out["label"].to_numpy())
    assert metrics["eval_loss"] == pytest.approx(again["loss"], abs=1e-3)


def test_qlora_needs_the_shared_backbone():
    with pytest.raises(ValueError, match="set reward_model.shared_backbone to true"):
        RewardModelConfig(method="qlora")


def test_reward_bias_script_prints_a_share_per_prompt_set(tiny_path, sl_adapter, reward_dir, tmp_path):
    """benchmarks/reward_bias.py on the tiny preset: one row per reward model, three shares with intervals."""
    lines = run_benchmark(
        "reward_bias.py",
        "--config",
        "configs/tiny.yaml",
        "--storage",
        str(tmp_path),
        "--sl-model",
        str(sl_adapter),
        "--reward-model",
        str(reward_dir),
        "--max-new-tokens",
        "4",
    )
    assert lines[0].startswith("share of prompts where the reward model scores the refusal above")
    assert "look-alikes (tune)" in lines[1] and "training red-team" in lines[1]
    row = lines[2]
    assert row.startswith(str(reward_dir)[-48:])
    assert len(re.findall(r"\d+% \[\d+%,\d+%\] n=\d+", row)) == 3, row


def test_tuning_script_measures_stages_on_the_tune_split(tiny_path, sl_adapter, tmp_path):
    """benchmarks/tune_system_prompt.py --stages-only: base and each stage on prompts never trained on."""
    lines = run_benchmark(
        "tune_system_prompt.py",
        "--config",
        "configs/tiny.yaml",
        "--set",
        "prompts.tune_fraction=0.4",
        "--storage",
        str(tmp_path),
        "--stages-only",
        "--stage-model",
        str(sl_adapter),
        "--max-new-tokens",
        "4",
    )
    header = "stage refuses red-team (tune) refuses look-alikes (tune) refuses training benign"
    assert lines[0].split() == header.split()
    assert lines[1].startswith("base (no system prompt)") and lines[2].startswith(str(sl_adapter)[-56:])
    assert len(lines) == 3  # no candidate table with --stages-only
    for row in lines[1:]:
        cells = re.findall(r"\d+% \[\d+%,\d+%\] (\d+)/(\d+)", row)
        assert len(cells) == 3, row
        assert int(cells[0][1]) > 0  # the tune split has red-team prompts


def test_reward_scoring_benchmark_prints_both_ways_and_their_agreement(model_store):
    """benchmarks/reward_scoring.py on the tiny preset: a line per way, then the ratio and the difference."""
    from tests.benchmark_scripts import run_benchmark

    lines = run_benchmark(
        "reward_scoring.py",
        "--config",
        "configs/tiny.yaml",
        "--storage",
        str(model_store),
        "--limit",
        "6",
        "--repeats",
        "1",
    )
    assert re.match(
        r"24 sequences \(6 prompts x 4 answers, [\d.]+ tokens on average\), batch \d+, ", lines[0]
    )
    assert lines[1].startswith("prefix once") and lines[2].startswith("whole sequences")
    diff = float(lines[3].rsplit(" ", 1)[1])
    assert lines[3].startswith("speed-up ") and diff < 1e-4
