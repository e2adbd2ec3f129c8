"""`trimformer calibrate schedule`: calibration prompts (docstring prose, planted facts, none of the needle
eval's words), evidence recall on hand-built scores, and the whole pipeline on a tiny random Llama writing a
preset that trim() finds by path and in the cache folder."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import trimformer
from trimformer import presets
from trimformer.errors import ConfigError
from trimformer_lab.calibrate import evidence as ev
from trimformer_lab.calibrate import prompts as cp
from trimformer_lab.calibrate.cli import write_calibration
from trimformer_lab.calibrate.search import (CalibrateOptions, Screen, answer_text, calibrate_schedule, flops_ratio,
                                             pick_diverse, tokens_per_layer, work_share)
from trimformer_lab.evaluation.needle import CITIES, NEEDLE

from conftest import TINY


class CharTokenizer:
    """One token per character (code points above 255 become 255); no chat template, no eos."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(ord(c), 255) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": 256, "max_position_embeddings": 1024})).eval()
    model.config._attn_implementation = "sdpa"
    return model


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIMFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(presets, "_WARNED", set())
    return tmp_path / "cache"


# ---- prompts ---------------------------------------------------------------------------------------
def test_prompts_plant_facts_in_docstring_prose_without_the_needle_eval_words():
    tok = CharTokenizer()
    prompts = cp.make_prompts(tok, 6, 900, seed=3)
    needle_words = [NEEDLE.split("{")[0].strip(), "magic number", *CITIES]
    for i, p in enumerate(prompts):
        text = tok.decode(p.input_ids[0])
        assert p.length == 900
        assert not any(word.lower() in text.lower() for word in needle_words), i
        assert len(p.facts) == 1 + i % 3 and p.evidence in p.facts
        fact = tok.decode(p.input_ids[0, p.evidence[0]: p.evidence[1]])
        assert p.answer in fact and fact.strip().endswith(".")
        assert text.endswith(p.answer_prefix) and p.question in text[-len(p.question) - 200:]
    # distinct haystacks, and several kinds of answers
    assert len({tok.decode(p.input_ids[0, 50:150]) for p in prompts}) == len(prompts)
    assert len({kind for p in prompts for kind in p.kinds}) >= 3


def test_haystack_is_standard_library_prose_without_eval_words():
    paragraphs = cp.haystack_paragraphs(200_000)
    text = "\n".join(paragraphs).lower()
    assert len("\n\n".join(paragraphs)) >= 200_000
    assert ">>>" not in text and "magic number" not in text
    assert not any(city.lower() in text for city in CITIES)
    assert cp.haystack_paragraphs(200_000) == paragraphs                     # deterministic


def test_too_short_a_prompt_is_refused():
    with pytest.raises(trimformer.errors.InputError, match="too short"):
        cp.make_prompts(CharTokenizer(), 1, 60)


# ---- evidence recall on hand-built scores ---------------------------------------------------------
def test_evidence_recall_and_need_on_hand_built_scores():
    scores = torch.arange(20, dtype=torch.float32)          # token i scores i: the last tokens rank first
    protected = torch.zeros(20, dtype=torch.bool)
    protected[0] = protected[19] = True                      # a sink and the last token
    evidence = torch.zeros(20, dtype=torch.bool)
    evidence[[10, 15]] = True
    # keep 0.5 -> 10 tokens: protected 0 and 19, then 18, 17, ..., 11 (8 more): 15 kept, 10 not
    assert ev.evidence_recall(scores, evidence, 0.5, protected) == 0.5
    assert ev.evidence_recall(scores, evidence, 0.55, protected) == 1.0      # 11 tokens reach token 10
    assert ev.evidence_recall(scores, evidence, 0.1, protected) == 0.0       # only the protected two
    assert ev.keep_index(scores, 0.25, protected).tolist() == [0, 16, 17, 18, 19]
    # token 10 ranks 11th (two protected, then 18..10): need 11 / 20
    assert ev.evidence_need(scores, evidence, protected) == pytest.approx(11 / 20)
    # span pooling lifts a token's neighbours: one high token at 11 carries token 10 with it
    peak = torch.zeros(20)
    peak[11] = 5.0
    first = torch.zeros(20, dtype=torch.bool)
    first[10] = True
    none = torch.zeros(20, dtype=torch.bool)
    assert ev.evidence_need(peak, first, none) == pytest.approx(12 / 20)   # 11, then ties by slot: 0..9, 10
    assert ev.evidence_need(peak, first, none, span=3) == pytest.approx(1 / 20)
    assert ev.evidence_recall(peak, first, 0.05, none, span=3) == 1.0


def test_cascade_follows_each_stage_on_the_live_tokens():
    n = 10
    protected = torch.zeros(n, dtype=torch.bool)
    evidence = torch.zeros(n, dtype=torch.bool)
    evidence[2] = True
    layer0 = torch.tensor([0, 0, 9, 8, 7, 6, 5, 0, 0, 0], dtype=torch.float32)  # keeps 2..6 at 0.5
    layer1 = torch.tensor([0, 0, 1, 5, 5, 5, 9, 9, 9, 9], dtype=torch.float32)  # of those: 6, then 3, 4
    scores = torch.stack([layer0, layer1, torch.ones(n)])                      # (L-1 = 3, n)
    recall, mass = ev.cascade(scores, {0: 0.5}, evidence, protected)
    assert recall == 1.0
    assert mass == pytest.approx((sum(layer1[2:7]) / sum(layer1) + 0.5) / 2)  # layers 1 and 2 on tokens 2..6
    recall, _ = ev.cascade(scores, {0: 0.5, 1: 0.6}, evidence, protected)      # 3 of 5 live: token 2 goes
    assert recall == 0.0


def test_work_share_and_flops_follow_the_schedule():
    assert work_share({0: 0.5}, 2) == pytest.approx(0.75)
    assert work_share({7: 0.4, 14: 0.5, 18: 0.5, 23: 0.5}, 30) == pytest.approx(0.41333, abs=1e-4)
    assert tokens_per_layer({1: 0.5, 2: 0.5}, 4, 100) == [100, 100, 50, 25]
    config = LlamaConfig(**TINY)
    assert flops_ratio(config, {0: 0.25}, 400) > flops_ratio(config, {0: 0.5}, 400) > 1.0


# ---- the pipeline ----------------------------------------------------------------------------------
def test_reference_scores_come_from_the_full_model(tiny):
    prompt = cp.make_prompts(CharTokenizer(), 1, 300)[0]
    ref = ev.record_reference(tiny, prompt, ev.ScoreOptions(), new_tokens=3)
    assert ref.scores.shape == (5, 300) and bool((ref.scores >= 0).all())
    with torch.inference_mode():
        logits = tiny(input_ids=prompt.input_ids).logits[0, -1]
    assert torch.allclose(ref.logprobs, logits.log_softmax(-1), atol=1e-4)   # keep 1.0 everywhere = the full model
    assert not trimformer.is_trimmed(tiny)
    same = ev.run_trimmed(tiny, prompt, {2: 1.0}, ref, ev.ScoreOptions())
    assert same.kl == pytest.approx(0.0, abs=1e-5) and same.agrees and same.evidence_kept


def test_calibration_end_to_end_writes_a_preset_trim_finds(tiny, tmp_path, cache):
    opts = CalibrateOptions(prompts=2, length=400, target_work=0.7, verify=2, stages=(3,), new_tokens=3)
    result = calibrate_schedule(tiny, CharTokenizer(), opts, progress=False)
    best = result.best
    assert best.eligible and work_share(best.schedule, 6) <= 0.7 + 1e-9 and len(best.schedule) == 3
    assert best.key() == max(v.key() for v in result.verified if v.eligible)
    assert {v.source for v in result.verified} >= {"screen", "fallback"}
    out = tmp_path / "tiny.json"
    written = write_calibration(result, tiny.config, "tiny-llama", str(out), to_cache=True)
    assert written[1] == presets.cache_path(tiny.config) and written[1].parent == cache / "presets"
    saved = json.loads(out.read_text())
    assert saved["model"]["name"] == "tiny-llama" and saved["method"] == "lazy"
    for key in ("work_share", "flops_ratio", "agreement", "evidence_kept", "kl_mean", "seconds", "verified"):
        assert key in saved["measured"]
    assert saved["calibration"]["prompts"] == 2 and "docstrings" in saved["calibration"]["text"]
    assert saved["calibration"]["stages"] == [3] and saved["calibration"]["grid"] == list(opts.grid)
    schedule = {int(k): v for k, v in saved["schedule"].items()}
    assert schedule == best.schedule
    prompt = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(1))
    # found in the cache folder, with no option given
    trimformer.trim(tiny, method="lazy")
    tiny(input_ids=prompt)
    assert trimformer.stats(tiny)["schedule"] == schedule
    trimformer.untrim(tiny)
    # and by path, once the cache holds another schedule
    presets.save_preset(presets.cache_path(tiny.config), tiny.config, {1: 0.9})
    trimformer.trim(tiny, method="lazy", preset=str(out))
    tiny(input_ids=prompt)
    assert trimformer.stats(tiny)["schedule"] == schedule
    trimformer.untrim(tiny)


def test_a_target_no_schedule_reaches_is_refused(tiny):
    opts = CalibrateOptions(prompts=1, length=300, target_work=0.05, stages=(3,), new_tokens=1)
    with pytest.raises(ConfigError, match="reaches the target"):
        calibrate_schedule(tiny, CharTokenizer(), opts, progress=False)


@pytest.mark.parametrize("kwargs", [{"target_work": 1.5}, {"target_speedup": 0.9}, {"prompts": 0}, {"stages": ()},
                                    {"stages": (0, 2)}, {"grid": (0.2, 1.5)}, {"grid": ()}])
def test_bad_options_are_refused(kwargs):
    with pytest.raises(ConfigError):
        CalibrateOptions(**kwargs)


def test_fast_screen_agrees_with_the_exact_cascade_without_pooling():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 200, generator=generator)                     # (L-1, T), no ties
    prompt = cp.CalibrationPrompt(torch.zeros(1, 200, dtype=torch.long), "x", (120, 130), [(120, 130)], ["word"])
    ref = ev.Reference(scores, torch.zeros(3), [])
    opts = ev.ScoreOptions(span=1, sinks=2, protect_last=3)
    screen = Screen([ref], [prompt], opts)
    protected = ev.protected_mask(200, opts)
    for schedule in ({1: 0.5, 3: 0.5}, {0: 0.3, 2: 0.7, 3: 0.6}, {2: 0.9}):
        kept_all, recall, mass = screen(schedule)
        exact_recall, exact_mass = ev.cascade(scores, schedule, prompt.evidence_mask(), protected, span=1)
        assert recall == pytest.approx(exact_recall) and mass == pytest.approx(exact_mass)
        assert kept_all == float(exact_recall == 1.0)


def test_verification_picks_differ_in_first_stage_keep_then_in_layers():
    a, b, c, d = {1: 0.3, 2: 0.5}, {1: 0.3, 3: 0.5}, {1: 0.4, 2: 0.5}, {1: 0.3, 2: 0.6, 4: 0.6}
    e = {1: 0.3, 2: 0.5, 4: 0.5}
    rows = [(s, 1.0, 1.0, 0.5) for s in (a, b, c, d, e)]
    assert pick_diverse(rows, 2) == [a, c]                 # first-stage keep ratios 0.3 and 0.4
    assert pick_diverse(rows, 3) == [a, c, b]              # then first two layers (1, 3)
    assert pick_diverse(rows, 4) == [a, c, b, d]           # then layer sets: (1, 2, 4)
    assert pick_diverse(rows, 5) == [a, c, b, d]           # e repeats d's layers


def test_answers_compare_on_their_first_line_without_the_full_stop():
    tok = CharTokenizer()
    assert answer_text(tok, tok(" 29789.\nThe locker")["input_ids"]) == "29789"
    assert answer_text(tok, tok("Z9W-98Z")["input_ids"]) == answer_text(tok, tok(" Z9W-98Z.")["input_ids"])
