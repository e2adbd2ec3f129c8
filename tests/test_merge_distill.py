"""Merge distillation (`trimformer train-merge`): an encoder fine-tuned to keep its embeddings when merged.

Tiny random BERT encoders and synthetic sentences written to tmp_path; no shared data needed.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel, BertTokenizer

from trimformer import ConfigError, InputError, UnsupportedModelError
from trimformer.cli import main
from trimformer_lab.embedding import embedding_fidelity
from trimformer_lab.train.merge_distill import (MergeDistillOptions, distill_loss, train_merge_distill,
                                                training_sentences)

torch.set_num_threads(1)
WORDS = ["good", "bad", "movie", "film", "the", "a", "plot", "actor", "very", "quite", "scene", "story", "."]
CONFIG = {"method": "tome", "r": 2}


def _sentences(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=g)))
    return out


@pytest.fixture
def encoder_and_data(tmp_path):
    """A tiny BERT encoder folder (word-level tokenizer, no dropout) and a data folder with sst2/train.tsv,
    sst2/dev.tsv and qnli/dev.tsv of random sentences."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(tmp_path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    folder = tmp_path / "encoder"
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "data"
    (data / "sst2").mkdir(parents=True)
    (data / "qnli").mkdir()
    (data / "sst2" / "train.tsv").write_text("text\tlabel\n" + "".join(f"{s}\t0\n" for s in _sentences(256, 1)))
    (data / "sst2" / "dev.tsv").write_text("text\tlabel\n" + "".join(f"{s}\t1\n" for s in _sentences(32, 2)))
    qnli = _sentences(32, 3)
    (data / "qnli" / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n" + "".join(
        f"{i}\t{qnli[2 * i]}\t{qnli[2 * i + 1]}\tentailment\n" for i in range(16)))
    return folder, data


def test_distill_loss_known_values():
    mask = torch.tensor([[1, 1, 0]])
    a = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 5.0]]])           # pooled (1, 0): padding left out
    b = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [9.0, 9.0]]])           # pooled (0, 1): orthogonal
    assert distill_loss(a, a, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert distill_loss(a, b, mask).item() == pytest.approx(1.0)
    c = torch.tensor([[[1.0, 1.0], [1.0, -1.0], [0.0, 0.0]]])          # pooled (1, 0) as a's; tokens at 45 degrees
    assert distill_loss(c, a, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert distill_loss(c, a, mask, token_weight=2.0).item() == pytest.approx(2.0 * (1 - 2 ** -0.5))


def test_reference_compares_with_another_model(encoder_and_data):
    folder, _ = encoder_and_data
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = BertTokenizer.from_pretrained(folder)
    sentences = _sentences(12, 5)
    same = embedding_fidelity(model, tokenizer, sentences, {"method": "tome", "r": 0}, reference=copy.deepcopy(model))
    assert same["mean_cosine"] == pytest.approx(1.0, abs=1e-6) and same["kept_fraction"] == 1.0
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.encoder.layer[-1].output.dense.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    moved = embedding_fidelity(model, tokenizer, sentences, {"method": "tome", "r": 0}, reference=other)
    assert moved["mean_cosine"] < 0.99
    merged = embedding_fidelity(model, tokenizer, sentences, CONFIG)                  # reference None: itself
    assert merged == embedding_fidelity(model, tokenizer, sentences, CONFIG, reference=copy.deepcopy(model))


def test_training_brings_merged_embeddings_closer_and_the_folder_reloads(encoder_and_data, tmp_path):
    folder, data = encoder_and_data
    out = tmp_path / "student"
    opts = MergeDistillOptions(model=str(folder), config=CONFIG, steps=40, batch=16, lr=3e-3, dev_sentences=32,
                               data=str(data))
    record = train_merge_distill(opts, out, progress=False)
    for task in ("sst2", "qnli"):
        before, after = record["dev_before"][task], record["dev_after"][task]
        assert after["sentences"] == 32 and before["kept_fraction"] == after["kept_fraction"] < 0.9
        assert 1 - after["mean_cosine"] < 0.6 * (1 - before["mean_cosine"])      # the gap at least 40% smaller
    assert json.loads((out / "merge_distill.json").read_text())["dev_after"] == record["dev_after"]
    # the saved encoder, trimmed with the same configuration, gives the recorded fidelity against the original
    student = AutoModel.from_pretrained(out).eval()
    teacher = AutoModel.from_pretrained(folder).eval()
    tokenizer = BertTokenizer.from_pretrained(out)
    sentences = [line.split("\t")[0] for line in (data / "sst2" / "dev.tsv").read_text().splitlines()[1:]]
    again = embedding_fidelity(student, tokenizer, sentences, CONFIG, reference=teacher)
    assert again["mean_cosine"] == pytest.approx(record["dev_after"]["sst2"]["mean_cosine"], abs=1e-4)
    # the word embeddings were frozen; the layers moved
    assert torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    assert not torch.equal(student.encoder.layer[0].output.dense.weight, teacher.encoder.layer[0].output.dense.weight)
    # --init: a second run starts from the saved student and still compares with the original encoder
    more = train_merge_distill(MergeDistillOptions(model=str(folder), init=str(out), config=CONFIG, steps=1, batch=4,
                                                   dev_sentences=32, data=str(data)), tmp_path / "more", progress=False)
    assert more["dev_before"] == record["dev_after"]


def test_training_sentences_reads_the_sources_by_length_and_leaves_out_dev(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("text\tlabel\na b c d e\t1\ntoo short\t0\nf g h i j\t0\n")
    (tmp_path / "sst2" / "dev.tsv").write_text("text\tlabel\nf g h i j\t0\n")          # a dev sentence: left out
    (tmp_path / "wmt16_en_de").mkdir()
    (tmp_path / "wmt16_en_de" / "news.en").write_text("one two three four five six\n\n")
    (tmp_path / "wmt16_en_de" / "news.de").write_text("eins zwei drei vier fuenf sechs\n")
    (tmp_path / "pg_essays").mkdir()
    (tmp_path / "pg_essays" / "essay.txt").write_text("First of all we\nwrite five. No. Is this six words long?")
    (tmp_path / "pg_essays" / "LICENSE-x.txt").write_text("licence text of many many words here.")
    (tmp_path / "longbench").mkdir()
    prompt = ("Passage 1: Rhosgoch is a village.NEWLINE_CHAR It lies on Anglesey in Wales! Who? "
              "Where is the question now?")
    (tmp_path / "longbench" / "hotpotqa.json").write_text(json.dumps({"0": {"origin_prompt": prompt, "gold": []}}))
    (tmp_path / "longbench" / "lcc.json").write_text(json.dumps({"0": {"origin_prompt": "code is not read at all."}}))
    (tmp_path / "qnli").mkdir()
    (tmp_path / "qnli" / "dev.tsv").write_text("idx\tquestion\tsentence\tlabel\n0\tWhere is the question now?\tx\t0\n")
    assert training_sentences(tmp_path, min_words=5, max_words=6) == [
        "a b c d e", "one two three four five six", "First of all we write five.", "Is this six words long?",
        "Passage 1: Rhosgoch is a village.", "It lies on Anglesey in Wales!"]
    assert training_sentences(tmp_path, min_words=5, max_words=6, sources=("wmt16", "longbench")) == [
        "one two three four five six", "Passage 1: Rhosgoch is a village.", "It lies on Anglesey in Wales!"]
    with pytest.raises(InputError, match="no training sentences of 7-8 words"):
        training_sentences(tmp_path, min_words=7, max_words=8)


def test_bad_options_fail_before_anything_is_written(encoder_and_data, tmp_path):
    folder, data = encoder_and_data
    out = tmp_path / "never"
    for bad, message in ((dict(steps=0), "steps and batch"), (dict(lr=0.0), "lr must be"),
                         (dict(config={"r": 2}), "needs a 'method'|with a 'method'"),
                         (dict(min_words=9, max_words=3), "min_words"),
                         (dict(sources=("sst2", "wiki")), "sources must be a non-empty subset")):
        with pytest.raises(ConfigError, match=message):
            train_merge_distill(MergeDistillOptions(model=str(folder), data=str(data), **bad), out, progress=False)
    with pytest.raises(UnsupportedModelError, match="runs on decoders"):   # refused by trim, before training
        train_merge_distill(MergeDistillOptions(model=str(folder), data=str(data), config={"method": "lazy"}),
                            out, progress=False)
    with pytest.raises(InputError, match="neither an embedded encoder"):
        train_merge_distill(MergeDistillOptions(model=str(tmp_path / "nowhere"), data=str(data)), out, progress=False)
    assert not out.exists()


def test_cli_train_merge_writes_the_folder(encoder_and_data, tmp_path, capsys):
    folder, data = encoder_and_data
    out = tmp_path / "cli"
    assert main(["train-merge", "--model", str(folder), "--data", str(data), "--config", json.dumps(CONFIG),
                 "--steps", "2", "--batch", "4", "--dev-sentences", "8", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "merge_distill.json").read_text())
    assert record["options"]["steps"] == 2 and record["options"]["config"] == CONFIG
    assert f"sst2: mean cosine to the full model {record['dev_before']['sst2']['mean_cosine']:.4f}" in printed
    assert (out / "model.safetensors").exists()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("good movie .")["input_ids"] == \
        BertTokenizer.from_pretrained(folder)("good movie .")["input_ids"]
