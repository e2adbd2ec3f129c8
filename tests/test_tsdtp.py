"""TS-DTP: scorer functions, exactness with nothing pruned, padded batches, training and checkpoint round trip.

Everything runs on tiny random BERT classifiers and a synthetic SST-2-like task written to tmp_path.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from trimformer import ConfigError, UnsupportedModelError, stats, trim, untrim
from trimformer.evaluation.glue import load_classifier, matched_keep, ratio_kept_share, run_batches, tsdtp_options
from trimformer.evaluation.glue_data import collate, length_batches, tokenize, Example
from trimformer.scoring.learned import model_signature
from trimformer.scoring.task_attention import relative_log_scores, task_attention, threshold_counts
from trimformer.train.tsdtp import TaskTrainOptions, soft_forward, train_task
from trimformer.tsdtp import TSDTPConfig, TSDTPPruner

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
                            epochs=8, batch=16, lr=1e-3, pruner_lr=1e-2, target=0.7, freeze_embeddings=False)
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


def test_training_is_deterministic_under_a_seed(synthetic, tmp_path):
    model_dir, data = synthetic
    opts = TaskTrainOptions(task="sst2", model=str(model_dir), data=str(data), layers=[1], rank=4, epochs=0.25,
                            batch=16, seed=3)
    a = train_task(opts, tmp_path / "a", progress=False, log_every=1)
    b = train_task(opts, tmp_path / "b", progress=False, log_every=1)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert (tmp_path / "a" / "tsdtp.safetensors").read_bytes() == (tmp_path / "b" / "tsdtp.safetensors").read_bytes()


# ---- data ----------------------------------------------------------------------------------------------
def test_qnli_split_is_fixed_disjoint_and_complete():
    from trimformer.evaluation.glue_data import default_data_dir, load_examples

    if not (default_data_dir() / "qnli" / "dev.tsv").exists():
        pytest.skip(f"GLUE data not found at {default_data_dir()} (../shared/data next to the project)")
    train, dev = load_examples("qnli", "train"), load_examples("qnli", "dev")
    assert len(train) + len(dev) == 5463 and len(dev) == 5463 - int(5463 * 0.8)
    assert not {(e.text, e.pair) for e in train} & {(e.text, e.pair) for e in dev}
    assert load_examples("qnli", "dev") == dev
    assert {e.label for e in dev} == {0, 1} and all(e.pair for e in dev)
