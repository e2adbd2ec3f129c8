"""TS-DTP: scorer functions, exactness with nothing pruned, padded batches, training and checkpoint round trip.

Everything runs on tiny random BERT classifiers and a synthetic SST-2-like task written to tmp_path.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from trimformer import ConfigError, UnsupportedModelError, stats, trim, untrim
from trimformer_lab.classifier import load_classifier, run_batches, tsdtp_options
from trimformer_lab.evaluation.glue import matched_keep, ratio_kept_share
from trimformer_lab.glue_data import collate, length_batches, tokenize, Example
from trimformer.pruners.sdtp import model_signature
from trimformer.ops.task_attention import relative_log_scores, task_attention, threshold_counts
from trimformer_lab.train.tsdtp import TaskTrainOptions, distill_loss, share_target, soft_forward, train_task
from trimformer.pruners.tsdtp import TSDTPConfig, TSDTPPruner, batch_counts, set_counts

torch.set_num_threads(1)
WORDS = ["good", "bad", "movie", "film", "the", "a", "plot", "actor", "very", "quite", "scene", "story"]


def tiny_bert(seed: int = 0, layers: int = 4) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, num_labels=2)
    config._attn_implementation = "sdpa"
    return BertForSequenceClassification(config).eval()


def pruner_for(model, layers, thresholds, seed: int = 1) -> TSDTPPruner:
    torch.manual_seed(seed)
    pruner = TSDTPPruner(TSDTPConfig(model_signature(model.config), layers, rank=8))
    with torch.no_grad():
        pruner.threshold.copy_(torch.tensor(thresholds, dtype=torch.float32))
    return pruner.eval()


def padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:] = 0
    mask[2, 6:] = 0
    ids[:, 0] = 2
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


# ---- pure scoring ------------------------------------------------------------------------------------
def test_task_attention_is_a_distribution_over_live_tokens_only():
    g = torch.Generator().manual_seed(0)
    q, f = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1]], dtype=torch.float32)
    imp = task_attention(q, f, keep)
    assert torch.allclose(imp.sum(-1), torch.ones(2))
    assert (imp[keep == 0] == 0).all() and (imp[keep == 1] > 0).all()
    # a dropped token changes nothing for the others: same as computing on the live tokens alone
    alone = task_attention(q[:1, :4], f[:1, :4], torch.ones(1, 4))
    assert torch.allclose(imp[0, :4], alone[0], atol=1e-6)


def test_threshold_counts_follow_the_scores_and_keep_protected_tokens():
    scores = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    protected = torch.tensor([[True, False, False, True], [True, False, False, False]])
    z = relative_log_scores(scores, valid.float())          # log(score x 4): 0 = the uniform share
    assert torch.allclose(z[1], torch.zeros(4), atol=1e-6)
    # row 0: protected 0 and 3, plus token 1 (0.3 x 4 > 1); row 1: all at the threshold 0
    assert threshold_counts(z, valid, protected, 0.0).tolist() == [3, 4]
    assert threshold_counts(z, valid, protected, 0.5).tolist() == [2, 1]


def test_batch_counts_spread_the_batch_budget_over_the_rows():
    valid = torch.tensor([[1] * 10, [1] * 10, [1] * 6 + [0] * 4], dtype=torch.bool)
    protected = torch.zeros_like(valid)
    protected[:, 0] = True
    protected[torch.arange(3), valid.sum(-1) - 1] = True
    counts = torch.tensor([10, 2, 4])                 # droppable kept: 8 + 0 + 2 = 10 of 8 + 8 + 4 = 20
    out = batch_counts(counts, valid, protected)
    assert out.tolist() == [6, 6, 4]                  # 2 protected + half of each row's droppable tokens
    assert int(out.sum()) == int(counts.sum())
    # largest remainder: the total stays exact when the share does not divide evenly
    out = batch_counts(torch.tensor([9, 2, 2]), valid, protected)    # budget 7 of 20 -> 2.8, 2.8, 1.4
    assert out.tolist() == [5, 5, 3] and int(out.sum()) == 13
    # rows with nothing droppable keep their protected tokens
    only = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    assert batch_counts(torch.tensor([2]), only, only).tolist() == [2]


# ---- the trimmed model -------------------------------------------------------------------------------
def test_nothing_pruned_gives_the_encoders_own_outputs(tmp_path):
    model = tiny_bert()
    pruner = pruner_for(model, [0, 1, 2], [-1e9, -1e9, -1e9])       # every token above the threshold
    pruner.save(tmp_path)
    batch = padded_batch()
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True)
        trim(model, method="tsdtp", pruner=str(tmp_path), layers=[0, 1, 2])
        out = model(**batch, output_hidden_states=True)
        kept = stats(model)["kept_fraction"]
        untrim(model)
    valid = batch["attention_mask"].bool()
    assert kept == 1.0
    assert float((out.logits - ref.logits).abs().max()) < 1e-4
    assert float((out.hidden_states[-1][valid] - ref.hidden_states[-1][valid]).abs().max()) < 1e-4


def test_padded_batch_keeps_cls_and_matches_each_row_alone(tmp_path):
    model = tiny_bert()
    pruner_for(model, [0, 1, 2], [0.0, 0.2, 0.2]).save(tmp_path)
    batch = padded_batch()
    trim(model, method="tsdtp", pruner=str(tmp_path), layers=[0, 1, 2])
    with torch.no_grad():
        logits = model(**batch).logits
        s = stats(model)
        kept = model._trimformer_patch.state.kept                         # (B, N) input token still live
        rows = []
        for b in range(3):
            n = int(batch["attention_mask"][b].sum())
            rows.append(model(**{k: v[b:b + 1, :n] for k, v in batch.items()}).logits)
    untrim(model)
    assert kept[:, 0].all(), "[CLS] was dropped"
    lengths = batch["attention_mask"].sum(-1)
    assert kept[torch.arange(3), lengths - 1].all(), "a row's last token ([SEP]) was dropped"
    assert not kept[batch["attention_mask"] == 0].any(), "padding counted as live"
    assert s["kept_fraction"] < 0.9 and s["dropped_per_layer"][0] > 0
    assert float((logits - torch.cat(rows)).abs().max()) < 1e-4


def test_batch_counts_make_the_batch_as_narrow_as_the_kept_share(tmp_path):
    """counts="batch": the same tokens dropped in total at the first pruning layer as per-row thresholds,
    but every row keeps about as many, so the hidden states after it are narrower than the widest row."""
    model = tiny_bert()
    pruner_for(model, [0], [0.0]).save(tmp_path)
    g = torch.Generator().manual_seed(5)
    batch = {"input_ids": torch.randint(5, 100, (6, 24), generator=g), "attention_mask": torch.ones(6, 24, dtype=torch.long)}
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    widths: list[int] = []
    hook = model.bert.encoder.layer[1].attention.register_forward_pre_hook(lambda m, a: widths.append(a[0].shape[1]))
    result = {}
    with torch.no_grad():
        for counts in ("row", "batch"):
            trim(model, method="tsdtp", pruner=str(tmp_path), layers=[0])
            if counts == "batch":
                set_counts(model, counts)
            model(**batch)
            s = stats(model)
            result[counts] = (widths[-1], s["mlp_tokens_per_layer"][0], s["dropped_per_layer"][0])
            untrim(model)
    hook.remove()
    (w_row, kept_row, dropped_row), (w_batch, kept_batch, dropped_batch) = result["row"], result["batch"]
    assert dropped_row > 0 and kept_row == kept_batch and dropped_row == dropped_batch
    assert w_batch == -(-kept_batch // 6) < w_row                 # ceil(kept / rows), narrower than per-row
    with pytest.raises(ConfigError, match="counts"):
        set_counts(model, "batch")                                # not trimmed
    trim(model, method="tsdtp", pruner=str(tmp_path), layers=[0])
    with pytest.raises(ConfigError, match="counts must be one of"):
        set_counts(model, "rows")
    untrim(model)
    with pytest.raises(ConfigError, match="counts must be one of"):
        TSDTPConfig(model_signature(model.config), [0], rank=8, counts="widest") and TSDTPPruner(
            TSDTPConfig(model_signature(model.config), [0], rank=8, counts="widest"))


def test_set_counts_reads_the_attribute_trim_keeps_the_patch_under():
    # pruners.tsdtp names the attribute instead of importing it from the api (which imports the scorers)
    from trimformer import api
    from trimformer.pruners import tsdtp

    assert tsdtp.PATCH_ATTR == api.PATCH_ATTR


def test_hard_training_forward_equals_the_trimmed_model(tmp_path):
    """The training path (dropped tokens masked out of every later attention) and the inference path
    (dropped tokens gathered away, masks rebuilt) agree: same logits and the same kept share."""
    model = tiny_bert()
    pruner = pruner_for(model, [0, 1, 2], [-0.2, 0.0, 0.1])
    pruner.save(tmp_path)
    batch = padded_batch(seed=3)
    with torch.no_grad():
        logits, share = soft_forward(model, pruner, batch, temperature=0.1, hard=True)
        trim(model, method="tsdtp", pruner=str(tmp_path), layers=[0, 1, 2])
        trimmed = model(**batch).logits
        kept = stats(model)["kept_fraction"]
        untrim(model)
        full = model(**batch).logits
    assert kept < 0.8
    assert abs(float(share) - kept) < 1e-6
    assert float((logits - trimmed).abs().max()) < 1e-4
    assert float((full - trimmed).abs().max()) > 1e-4          # pruning did change the result


def test_soft_masks_give_gradients_to_the_pruner():
    model = tiny_bert()
    pruner = pruner_for(model, [0, 1], [0.0, 0.0])
    logits, share = soft_forward(model, pruner, padded_batch(), temperature=0.5)
    (logits.sum() + share).backward()
    for name, p in pruner.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_cls_attention_kept_share_matches_the_analytic_share():
    """The generic row of the table is run at a keep ratio found analytically: check the analysis."""
    model = tiny_bert()
    batch = padded_batch()
    lengths = batch["attention_mask"].sum(-1).tolist()
    keep = matched_keep(lengths, [0, 2], 4, 0.6)
    assert ratio_kept_share(lengths, [0, 2], keep, 4) >= 0.6 > ratio_kept_share(lengths, [0, 2], keep - 0.05, 4)
    trim(model, method="cls_attention", keep=keep, layers=[0, 2])
    with torch.no_grad():
        model(**batch)
    measured = stats(model)["kept_fraction"]
    untrim(model)
    assert abs(measured - ratio_kept_share(lengths, [0, 2], keep, 4)) < 1e-9


@pytest.mark.parametrize("method", ["tsdtp", "cls_attention"])
def test_cls_only_last_keeps_the_logits_and_runs_the_last_mlp_on_cls(tmp_path, method):
    """The last layer's MLP on [CLS] alone: the same logits (the head reads [CLS]), one MLP token per row in
    the last layer, and the kept share the analysis gives."""
    model = tiny_bert()
    batch = padded_batch()
    if method == "tsdtp":
        pruner_for(model, [0, 1, 2], [0.0, 0.2, 0.2]).save(tmp_path)
        options = {"method": "tsdtp", "pruner": str(tmp_path), "layers": [0, 1, 2]}
    else:
        options = {"method": "cls_attention", "keep": 0.6, "layers": [0, 2]}
    with torch.no_grad():
        trim(model, options)
        ref, ref_stats = model(**batch).logits, stats(model)
        trim(model, {**options, "cls_only_last": True})
        out, s = model(**batch).logits, stats(model)
        untrim(model)
    assert float((out - ref).abs().max()) < 1e-5
    assert s["mlp_tokens_per_layer"][:-1] == ref_stats["mlp_tokens_per_layer"][:-1]
    assert s["kept_tokens_per_layer"] == ref_stats["kept_tokens_per_layer"]
    assert s["mlp_tokens_per_layer"][-1] == 3                                  # [CLS] of each of the 3 rows
    total = 2 * 4 * sum(s["input_tokens"])
    saved = ref_stats["mlp_tokens_per_layer"][-1] - 3
    assert abs(s["kept_fraction"] - (ref_stats["kept_fraction"] - saved / total)) < 1e-12
    if method == "cls_attention":
        lengths = batch["attention_mask"].sum(-1).tolist()
        assert abs(s["kept_fraction"] - ratio_kept_share(lengths, [0, 2], 0.6, 4, cls_only_last=True)) < 1e-12


def test_cls_only_last_is_refused_where_other_outputs_are_read(llama):
    with pytest.raises(ConfigError, match="cls_only_last"):
        trim(tiny_bert(), method="tome", r=2, cls_only_last=True)
    with pytest.raises(ConfigError, match="cls_only_last"):
        trim(llama, method="lazy", keep=0.5, cls_only_last=True)
    with pytest.raises(ConfigError, match="cls_only_last must be True or False"):
        trim(tiny_bert(), method="cls_attention", keep=0.5, cls_only_last="yes")
    assert not hasattr(llama, "_trimformer_patch")


def test_errors_are_clear(tmp_path, llama):
    model = tiny_bert()
    with pytest.raises(ConfigError, match="pruner=PATH"):
        trim(model, method="tsdtp", layers=[0])
    with pytest.raises(ConfigError, match="no TS-DTP checkpoint"):
        trim(model, method="tsdtp", pruner=str(tmp_path / "missing"), layers=[0])
    pruner_for(model, [1], [0.0]).save(tmp_path)
    with pytest.raises(ConfigError, match="layers"):
        trim(model, method="tsdtp", pruner=str(tmp_path), layers=[0, 1])
    with pytest.raises(ConfigError, match="trained for"):
        trim(tiny_bert(layers=3), method="tsdtp", pruner=str(tmp_path), layers=[1])
    with pytest.raises(UnsupportedModelError, match="BERT"):
        trim(llama, method="tsdtp", pruner=str(tmp_path))
    assert not hasattr(model, "_trimformer_patch")


# ---- losses and schedules -------------------------------------------------------------------------------
def test_distill_loss_on_hand_made_logits():
    import math

    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])      # soft labels (0.75, 0.25) and (0.5, 0.5)
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0]])                 # uniform
    kl_first = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert abs(float(distill_loss(student, teacher)) - kl_first / 2) < 1e-6      # batch mean: (kl + 0) / 2
    assert float(distill_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)
    # temperature 2: T^2 x KL of the softened distributions
    p = torch.tensor([math.sqrt(3.0), 1.0]) / (math.sqrt(3.0) + 1.0)
    kl_t2 = float((p * (p / 0.5).log()).sum())
    assert abs(float(distill_loss(student, teacher, 2.0)) - 4 * kl_t2 / 2) < 1e-6
    # gradient reaches the student only
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    distill_loss(s, t).backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0 and t.grad is None


def test_share_target_ramps_from_one_to_the_target():
    assert [share_target(step, 10, 0.5, 0.5) for step in range(10)] == pytest.approx(
        [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert [share_target(step, 10, 0.6, 0.0) for step in (0, 5, 9)] == [0.6, 0.6, 0.6]
    assert share_target(0, 10, 0.4, 1.0) == 1.0 and share_target(9, 10, 0.4, 1.0) == pytest.approx(0.46)


def test_new_training_options_are_checked():
    for bad, match in (({"target_ramp": 1.5}, "target_ramp"), ({"distill": 0.5}, "teacher"),
                       ({"distill": 1.2, "init": "x"}, "distill must be"), ({"distill_temperature": 0.0}, "distill_temperature"),
                       ({"aux_weight": -1.0}, "aux_weight"), ({"min_length": 0}, "min_length"),
                       ({"counts": "widest"}, "counts")):
        with pytest.raises(ConfigError, match=match):
            TaskTrainOptions(**bad).validate()


# ---- training and the checkpoint ---------------------------------------------------------------------
@pytest.fixture
def synthetic(tmp_path):
    """A tiny BERT folder (model + word-level tokenizer) and an SST-2-like data folder: the label says
    whether 'good' or 'bad' is in a sentence of filler words."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(tmp_path)
    model_dir = tmp_path / "backbone"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, num_labels=2, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "data" / "sst2"
    data.mkdir(parents=True)
    for split, n in (("train", 384), ("dev", 64)):
        lines = ["text\tlabel"]
        for _ in range(n):
            label = int(torch.randint(2, (1,), generator=g))
            words = [WORDS[2 + int(i)] for i in torch.randint(len(WORDS) - 2, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)]
            words.insert(int(torch.randint(len(words), (1,), generator=g)), "good" if label else "bad")
            lines.append(" ".join(words) + f"\t{label}")
        (data / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return model_dir, tmp_path / "data"


def test_training_lowers_the_loss_and_the_checkpoint_round_trips(synthetic, tmp_path):
    model_dir, data = synthetic
    opts = TaskTrainOptions(task="sst2", model=str(model_dir), data=str(data), layers=[1, 2], rank=8,
                            epochs=8, batch=16, lr=1e-3, pruner_lr=1e-2, target=0.7, freeze_embeddings=False,
                            counts="row")
    out = tmp_path / "ckpt"
    result = train_task(opts, out, progress=False, log_every=1)
    ce = [h["ce"] for h in result.history]
    assert sum(ce[-10:]) / 10 < sum(ce[:10]) / 10 - 0.1, f"loss did not fall: {ce[:10]} -> {ce[-10:]}"
    assert result.dev["accuracy"] > 0.75 and result.dev["kept_fraction"] < 1.0
    for name in ("config.json", "model.safetensors", "tsdtp.safetensors", "tsdtp.json", "train.json"):
        assert (out / name).exists(), name

    # round trip: the reloaded model and pruner predict exactly what the trained ones did
    reloaded, tokenizer = load_classifier(out)
    items = tokenize(tokenizer, [Example(t, None, 0) for t in ["good movie very", "the bad plot scene a story"]])
    batches = [collate(chunk) for chunk in length_batches(items, 2)]
    before, kept_before, _ = run_batches(result.model, batches, tsdtp_options(out))
    with torch.no_grad():
        logits_before = soft_forward(result.model, result.pruner, {k: v for k, v in batches[0].items() if k != "labels"},
                                     0.1, hard=True)[0]
    after, kept_after, _ = run_batches(reloaded, batches, tsdtp_options(out))
    with torch.no_grad():
        logits_after = soft_forward(reloaded, TSDTPPruner.load(out), {k: v for k, v in batches[0].items() if k != "labels"},
                                    0.1, hard=True)[0]
    assert torch.equal(before, after) and kept_before == kept_after
    assert torch.equal(logits_before, logits_after)

    # the table: one row per counts mode, the generic row at the first one's kept share
    from trimformer_lab.evaluation.glue import run_glue

    table = run_glue("sst2", out, baseline=model_dir, data=str(data), bench_count=1, repeats=1, warmup=0,
                     memory=False, progress=False, tsdtp_counts=["batch", "row"])
    rows = {r["method"]: r for r in table["results"]}
    assert list(rows) == ["finetuned", "cls_attention", "tsdtp", "tsdtp-row"]
    assert rows["tsdtp"]["counts"] == "batch" and rows["tsdtp-row"]["counts"] == "row"
    assert rows["cls_attention"]["kept_fraction"] >= rows["tsdtp"]["kept_fraction"] - 1e-9
    assert rows["tsdtp-row"]["accuracy"] == result.dev["accuracy"]     # train-task's dev check used the default, row
    # --cls-only-last: the same accuracies, less work in every pruned row, and the unpruned model with only that
    lean = run_glue("sst2", out, baseline=model_dir, data=str(data), bench_count=1, repeats=1, warmup=0,
                    memory=False, progress=False, tsdtp_counts=["batch"], cls_only_last=True)
    lean_rows = {r["method"]: r for r in lean["results"]}
    assert list(lean_rows) == ["finetuned", "finetuned-cls-only-last", "cls_attention", "tsdtp"]
    assert lean_rows["finetuned-cls-only-last"]["accuracy"] == rows["finetuned"]["accuracy"]
    assert lean_rows["finetuned-cls-only-last"]["kept_fraction"] < 1.0
    assert lean_rows["tsdtp"]["accuracy"] == rows["tsdtp"]["accuracy"]
    assert lean_rows["tsdtp"]["kept_fraction"] < rows["tsdtp"]["kept_fraction"]
    assert lean_rows["cls_attention"]["kept_fraction"] >= lean_rows["tsdtp"]["kept_fraction"] - 1e-9
    with pytest.raises(ConfigError, match="counts must be one of"):
        tsdtp_options(out, "widest")


def test_training_is_deterministic_under_a_seed(synthetic, tmp_path):
    model_dir, data = synthetic
    opts = TaskTrainOptions(task="sst2", model=str(model_dir), data=str(data), layers=[1], rank=4, epochs=0.25,
                            batch=16, seed=3)
    a = train_task(opts, tmp_path / "a", progress=False, log_every=1)
    b = train_task(opts, tmp_path / "b", progress=False, log_every=1)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert (tmp_path / "a" / "tsdtp.safetensors").read_bytes() == (tmp_path / "b" / "tsdtp.safetensors").read_bytes()


def test_distillation_ramp_and_min_length_train_deterministically(synthetic, tmp_path):
    """KD from a teacher, the target ramp and the length filter: the logged targets follow the ramp, KD is
    logged, only long rows are used, the checkpoint records counts, and two runs agree bit for bit."""
    model_dir, data = synthetic
    opts = TaskTrainOptions(task="sst2", model=str(model_dir), teacher=str(model_dir), data=str(data), layers=[1],
                            rank=4, epochs=0.5, batch=16, seed=4, distill=0.5, distill_temperature=2.0,
                            target=0.6, target_ramp=0.5, min_length=6, counts="batch")
    a = train_task(opts, tmp_path / "a", progress=False, log_every=1)
    b = train_task(opts, tmp_path / "b", progress=False, log_every=1)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    steps = a.steps
    assert [h["target"] for h in a.history] == pytest.approx([share_target(s, steps, 0.6, 0.5) for s in range(steps)])
    assert a.history[0]["target"] == 1.0 and a.history[-1]["target"] == 0.6
    assert all("kd" in h and h["kd"] > -1e-6 for h in a.history)
    import json

    record = json.loads((tmp_path / "a" / "train.json").read_text())
    assert 0 < record["train_examples"] < 384               # the rows under 6 tokens were left out
    assert TSDTPPruner.load(tmp_path / "a").config.counts == "batch"
    # with distill=1 the labels play no part: flipping them changes nothing
    flipped = tmp_path / "flipped"
    (flipped / "sst2").mkdir(parents=True)
    for split in ("train", "dev"):
        lines = (data / "sst2" / f"{split}.tsv").read_text().splitlines()
        (flipped / "sst2" / f"{split}.tsv").write_text("\n".join(
            [lines[0]] + [t + "\t" + str(1 - int(l)) for t, l in (x.rsplit("\t", 1) for x in lines[1:])]) + "\n")
    only_kd = dict(model=str(model_dir), teacher=str(model_dir), layers=[1], rank=4, epochs=0.25, batch=16, seed=4,
                   distill=1.0)
    c = train_task(TaskTrainOptions(task="sst2", data=str(data), **only_kd), tmp_path / "c", progress=False, log_every=1)
    d = train_task(TaskTrainOptions(task="sst2", data=str(flipped), **only_kd), tmp_path / "d", progress=False,
                   log_every=1)
    assert [h["loss"] for h in c.history] == [h["loss"] for h in d.history]


# ---- data ----------------------------------------------------------------------------------------------
def test_qnli_split_is_fixed_disjoint_and_complete():
    from trimformer_lab.glue_data import default_data_dir, load_examples

    if not (default_data_dir() / "qnli" / "dev.tsv").exists():
        pytest.skip(f"GLUE data not found at {default_data_dir()} (../shared/data next to the project)")
    train, dev = load_examples("qnli", "train"), load_examples("qnli", "dev")
    assert len(train) + len(dev) == 5463 and len(dev) == 5463 - int(5463 * 0.8)
    assert not {(e.text, e.pair) for e in train} & {(e.text, e.pair) for e in dev}
    assert load_examples("qnli", "dev") == dev
    assert {e.label for e in dev} == {0, 1} and all(e.pair for e in dev)
