"""Metrics: LongBench's standard metric per task, needle exact match, and trimmed-vs-full fidelity.

The LongBench metrics follow LongBench's own `metrics.py` (THUDM/LongBench): SQuAD-style answer
normalisation and token F1 for QA, ROUGE-L F for summaries, class matching for TREC, the share of
numbers in the answer that are right for the passage tasks, and edit similarity of the first code
line for LCC. ROUGE-L comes from Google's `rouge-score` package and edit similarity from
`rapidfuzz` (the same Indel ratio as `fuzzywuzzy.fuzz.ratio`, which LongBench uses, without its
rounding to whole percents). Every score is in [0, 1].
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from functools import lru_cache
from typing import Sequence

import torch

# ---- normalisation (as LongBench / SQuAD) -------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def first_line(prediction: str) -> str:
    """LongBench scores only the first line on the few-shot tasks (trec, triviaqa, samsum)."""
    return prediction.lstrip("\n").split("\n")[0]


# ---- QA -----------------------------------------------------------------------------------------
def token_f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """F1 of the bag-of-tokens overlap."""
    common = Counter(prediction_tokens) & Counter(reference_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, reference: str, **_: object) -> float:
    """LongBench's `qa_f1_score`: token F1 of the normalised answers."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


# ---- summarisation ------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("ROUGE-L needs the `rouge-score` package: pip install 'rouge-score>=0.1.2'") from exc
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str, **_: object) -> float:
    """ROUGE-L F-measure (longest common subsequence of lower-cased alphanumeric tokens)."""
    if not prediction.strip() or not reference.strip():
        return 0.0
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


# ---- classification -----------------------------------------------------------------------------
def classification_score(prediction: str, reference: str, all_classes: Sequence[str] = (), **_: object) -> float:
    """LongBench's `classification_score` (TREC): the classes named in the answer, less those that are
    only a part of the right class name; 1/len of them if the right class is among them, else 0.

    (LongBench's code means this; it removes from the list while iterating over it, which can skip a
    class, and its fallback to the closest class name is unreachable, so an answer naming no class
    scores 0 there too.)"""
    matches = [c for c in all_classes if c in prediction]
    matches = [c for c in matches if not (c in reference and c != reference)]
    if reference in matches:
        return 1.0 / len(matches)
    return 0.0


# ---- synthetic tasks ("exact match" of the paragraph number / count) ------------------------------
def _number_share(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(1 for n in numbers if n == target) / len(numbers)


def retrieval_score(prediction: str, reference: str, **_: object) -> float:
    """LongBench's `retrieval_score` (passage_retrieval_en): the reference is "Paragraph 19"; the score
    is the share of the numbers in the answer that are 19 (1.0 for "Paragraph 19", 0.5 for "19 or 3")."""
    found = re.findall(r"Paragraph (\d+)", reference)
    if not found:
        raise ValueError(f"a passage_retrieval reference looks like 'Paragraph 12', got {reference!r}")
    return _number_share(prediction, found[0])


def count_score(prediction: str, reference: str, **_: object) -> float:
    """LongBench's `count_score` (passage_count): the share of the numbers in the answer equal to the count."""
    return _number_share(prediction, str(reference).strip())


# ---- code ---------------------------------------------------------------------------------------
def code_sim_score(prediction: str, reference: str, **_: object) -> float:
    """LongBench's `code_sim_score` (lcc): edit similarity (Indel ratio, 0..1) between the reference line
    and the first line of the answer that is not a comment or a code fence."""
    from rapidfuzz import fuzz

    return float(fuzz.ratio(_code_line(prediction), reference)) / 100.0


def _code_line(prediction: str) -> str:
    """The first line of an answer that is not a comment or a code fence ("" if none)."""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            return candidate
    return ""


# ---- needle -------------------------------------------------------------------------------------
def number_match(prediction: str, answer: str, **_: object) -> float:
    """Needle exact match: 1.0 if the answer (a number) appears in the prediction, ignoring commas
    and spaces inside numbers ("1,234 567" matches "1234567"), else 0.0."""
    return 1.0 if answer in re.sub(r"[,\s]", "", prediction) else 0.0


def numbers_found(prediction: str, answer: str, **_: object) -> float:
    """Multi-needle recall: the share of the "|"-separated numbers of `answer` that appear in the prediction
    (commas and spaces inside numbers ignored)."""
    numbers = [n for n in answer.split("|") if n]
    text = re.sub(r"[,\s]", "", prediction)
    return sum(n in text for n in numbers) / len(numbers) if numbers else 0.0


METRICS = {
    "qa_f1": qa_f1_score,
    "rouge_l": rouge_l,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "count": count_score,
    "code_sim": code_sim_score,
    "number_match": number_match,
    "numbers_found": numbers_found,
}


def best_score(metric: str, prediction: str, references: Sequence[str], all_classes: Sequence[str] = (),
               first_line_only: bool = False) -> float:
    """The LongBench item score: the best score of the prediction against any reference answer."""
    if metric not in METRICS:
        raise KeyError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
    if first_line_only:
        prediction = first_line(prediction)
    fn = METRICS[metric]
    return max((fn(prediction, ref, all_classes=all_classes) for ref in references), default=0.0)


def answer_agreement(metric: str, candidate: str, reference: str, all_classes: Sequence[str] = (),
                     first_line_only: bool = False) -> float:
    """The task's own metric of the candidate (trimmed model's) answer against the reference (full
    model's) answer, in [0, 1]; 1.0 when the two (first lines, where scored so) are the same. Where the
    metric reads a class or a number out of the reference, that is read out of the full answer: the
    classes it names (classification), its first number (retrieval, count); a full answer naming none
    agrees only with a candidate that names none either."""
    if metric not in METRICS:
        raise KeyError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
    if first_line_only:
        candidate, reference = first_line(candidate), first_line(reference)
    if candidate == reference:
        return 1.0
    if metric == "classification":
        named = [c for c in all_classes if c in reference]
        named = [c for c in named if not any(c in other and c != other for other in named)]
        if not named:
            return 0.0 if any(c in candidate for c in all_classes) else 1.0
        return max(classification_score(candidate, c, all_classes) for c in named)
    if metric in ("retrieval", "count"):
        numbers = re.findall(r"\d+", reference)
        if not numbers:
            return 0.0 if re.findall(r"\d+", candidate) else 1.0
        return _number_share(candidate, numbers[0])
    if metric == "code_sim":
        return code_sim_score(candidate, _code_line(reference))
    if not reference.strip():
        return 0.0
    return METRICS[metric](candidate, reference, all_classes=all_classes)


# ---- fidelity: trimmed against full -------------------------------------------------------------
def token_agreement(reference: Sequence[int], candidate: Sequence[int], n: int) -> float:
    """Share of the first `n` reference tokens that the candidate reproduces at the same position
    (positions past the end of the candidate count as misses). Two empty sequences agree fully."""
    ref = list(reference)[:n]
    if not ref:
        return 1.0 if not list(candidate)[:n] else 0.0
    cand = list(candidate)[:n]
    return sum(1 for i, tok in enumerate(ref) if i < len(cand) and cand[i] == tok) / len(ref)


def prefix_agreement(reference: Sequence[int], candidate: Sequence[int], n: int) -> float:
    """Length of the common prefix of the first `n` tokens, as a share of the reference's first `n`."""
    ref, cand = list(reference)[:n], list(candidate)[:n]
    if not ref:
        return 1.0 if not cand else 0.0
    same = 0
    for a, b in zip(ref, cand):
        if a != b:
            break
        same += 1
    return same / len(ref)


def kl_divergence(reference_logprobs, candidate_logprobs) -> float:
    """KL(P_ref || P_cand) in nats between two next-token distributions given as log-probabilities
    (1-D tensors or sequences over the vocabulary)."""
    p = torch.as_tensor(reference_logprobs, dtype=torch.float64).flatten()
    q = torch.as_tensor(candidate_logprobs, dtype=torch.float64).flatten()
    if p.shape != q.shape:
        raise ValueError(f"distributions over different vocabularies: {tuple(p.shape)} vs {tuple(q.shape)}")
    p = torch.log_softmax(p, -1)
    q = torch.log_softmax(q, -1)
    kl = float((p.exp() * (p - q)).sum())
    return max(kl, 0.0) if math.isfinite(kl) else kl
