"""Fine-tune a sentence encoder to work merged: self-distillation toward the unmerged model.

ToMe works off the shelf, but a model trained with merging on loses less to it (Bolya et al., 2023,
"trained" rows). Here the student is a copy of the encoder with a trim configuration applied (ToMe
merging, or any encoder method); the teacher is the same encoder, untouched and unmerged. The loss is
1 - cosine between the mean-pooled embeddings of the two (sentence-transformers' pooling), plus
`token_weight` x the mean 1 - cosine over every real token's output, so the student learns to give, merged,
the embeddings the full model gives. The matching stays what it is (discrete, no gradient); the weights
learn to make its merges cheaper. Word embeddings stay frozen; dropout is off (the student runs in eval
mode, as it will at inference).

Training text: sentences of 5-40 words from `sources`: SST-2's training file, WMT16's English side, the PG
essays and the prose of the LongBench subset (Wikipedia passages, papers, reports, news, trivia and TREC
questions). Any sentence that also occurs in SST-2's or QNLI's dev split, where fidelity is measured, is
left out. The output folder holds the fine-tuned encoder (`save_pretrained`: config.json, model.safetensors,
the tokenizer) and merge_distill.json (options, the trim configuration, cosine to the full model on dev
sentences before and after). Load it with `AutoModel.from_pretrained(folder)` and trim it with the same configuration.
"""

from __future__ import annotations

import copy
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from trimformer.api import stats, trim, untrim
from trimformer.errors import ConfigError, InputError
from ..data import read_sentences, shared_data_dir
from ..embedding import embedding_fidelity, load_encoder, mean_pool


# training-text sources, read from the data folder by `training_sentences`
SOURCES = ("sst2", "wmt16", "pg_essays", "longbench")
# LongBench tasks read for prose (code, dialogue and synthetic passage tasks left out)
LONGBENCH_PROSE = ("hotpotqa", "2wikimqa", "multifieldqa_en", "qasper", "triviaqa", "gov_report", "multi_news", "trec")


@dataclass
class MergeDistillOptions:
    model: str = "minilm-l6"             # the full model: embedded name or folder (AutoModel + tokenizer)
    init: str | None = None              # start the student from this folder (e.g. an earlier run); default: model
    config: dict = field(default_factory=lambda: {"method": "tome", "reduction_ratio": 0.3})
    steps: int = 1000
    batch: int = 32
    lr: float = 1e-4
    warmup: float = 0.06                 # share of steps with a linear warm-up, then linear decay to 0
    token_weight: float = 0.0            # weight of the per-token cosine loss beside the pooled one
    min_words: int = 5                   # training sentences of min_words..max_words words
    max_words: int = 40
    max_length: int = 128                # tokens per sentence
    dev_sentences: int = 300             # per task (SST-2, QNLI dev), for the before / after record
    seed: int = 0
    data: str | None = None              # folder holding sst2/, wmt16_en_de/, pg_essays/ (default ../shared/data)
    sources: tuple[str, ...] = SOURCES   # where training sentences come from (see SOURCES)

    def validate(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ConfigError(f"steps and batch must be >= 1, got {self.steps} and {self.batch}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup must be a share of the steps in [0, 1), got {self.warmup}")
        if self.token_weight < 0:
            raise ConfigError(f"token_weight must be >= 0, got {self.token_weight}")
        if not 1 <= self.min_words <= self.max_words:
            raise ConfigError(f"need 1 <= min_words <= max_words, got {self.min_words} and {self.max_words}")
        unknown = [name for name in self.sources if name not in SOURCES]
        if unknown or not self.sources:
            raise ConfigError(f"sources must be a non-empty subset of {', '.join(SOURCES)}, got {list(self.sources)}")
        if not isinstance(self.config, dict) or "method" not in self.config:
            raise ConfigError(f"config must be a trim configuration with a 'method', got {self.config!r}")


def training_sentences(data: str | Path | None = None, min_words: int = 5, max_words: int = 40,
                       sources: tuple[str, ...] = SOURCES) -> list[str]:
    """Sentences of min_words..max_words words from the `sources` that exist under `data` (sst2/train.tsv,
    wmt16_en_de/*.en, pg_essays/*.txt, longbench/<LONGBENCH_PROSE>.json), in that order, leaving out any
    sentence of SST-2's or QNLI's dev split."""
    root = Path(data) if data is not None else shared_data_dir()
    out: list[str] = []
    sst2 = root / "sst2" / "train.tsv"
    if "sst2" in sources and sst2.exists():
        out += [line.split("\t")[0].strip() for line in sst2.read_text(encoding="utf-8").splitlines()[1:]]
    if "wmt16" in sources:
        for path in sorted((root / "wmt16_en_de").glob("*.en")):
            out += path.read_text(encoding="utf-8").splitlines()
    if "pg_essays" in sources:
        for path in sorted((root / "pg_essays").glob("*.txt")):
            if not path.name.upper().startswith("LICENSE"):
                out += _split_sentences(path.read_text(encoding="utf-8", errors="replace"))
    if "longbench" in sources:
        for task in LONGBENCH_PROSE:
            path = root / "longbench" / f"{task}.json"
            if path.exists():
                for example in json.loads(path.read_text(encoding="utf-8")).values():
                    out += _split_sentences(example["origin_prompt"].replace("NEWLINE_CHAR", " "))
    held_out = set()
    for task in ("sst2", "qnli"):
        if (root / task / "dev.tsv").exists():
            held_out.update(read_sentences(task, root))
    out = [s.strip() for s in out if min_words <= len(s.split()) <= max_words and s.strip() not in held_out]
    if not out:
        raise InputError(f"no training sentences of {min_words}-{max_words} words from {', '.join(sources)} under "
                         f"{root} (looked for sst2/train.tsv, wmt16_en_de/*.en, pg_essays/*.txt, longbench/*.json); "
                         "pass --data")
    return out


def _split_sentences(text: str) -> list[str]:
    """Running text -> sentences, split after . ? or ! followed by white space."""
    return re.split(r"(?<=[.?!])\s+", re.sub(r"\s+", " ", text))


def distill_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor,
                 token_weight: float = 0.0) -> torch.Tensor:
    """(B, T, D) student and teacher outputs, (B, T) mask -> 1 - cos of the mean-pooled embeddings
    (batch mean) + token_weight x (1 - cos) averaged over real tokens."""
    loss = (1 - F.cosine_similarity(mean_pool(student_hidden, mask), mean_pool(teacher_hidden, mask), dim=-1)).mean()
    if token_weight > 0:
        real = mask.bool()
        loss = loss + token_weight * (1 - F.cosine_similarity(student_hidden[real], teacher_hidden[real], dim=-1)).mean()
    return loss


def _dev_fidelity(student, teacher, tokenizer, dev: dict[str, list[str]], config: dict) -> dict:
    return {task: {k: round(v, 4) for k, v in embedding_fidelity(student, tokenizer, sentences, config,
                                                                  reference=teacher).items()}
            for task, sentences in dev.items()}


def train_merge_distill(opts: MergeDistillOptions, out: str | Path, progress: bool = True) -> dict:
    """Train the student, save it to `out`, return the record written to out/merge_distill.json."""
    opts.validate()
    torch.manual_seed(opts.seed)
    teacher, tokenizer = load_encoder(opts.model)
    teacher.eval().requires_grad_(False)
    student = (copy.deepcopy(teacher) if opts.init is None else load_encoder(opts.init)[0]).requires_grad_(True)
    trim(student, dict(opts.config))         # a bad configuration fails here, before any training
    untrim(student)
    student.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]

    sentences = training_sentences(opts.data, opts.min_words, opts.max_words, sources=tuple(opts.sources))
    random.Random(opts.seed).shuffle(sentences)
    data = Path(opts.data) if opts.data is not None else shared_data_dir()
    dev = {task: read_sentences(task, data, opts.dev_sentences) for task in ("sst2", "qnli")
           if (data / task / "dev.tsv").exists() and opts.dev_sentences > 0}
    before = _dev_fidelity(student, teacher, tokenizer, dev, opts.config)

    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, int(opts.warmup * opts.steps), opts.steps)
    history: list[dict] = []
    start = time.perf_counter()
    trim(student, dict(opts.config))
    try:
        running = None
        bar = tqdm(range(opts.steps), desc="merge distill", disable=not progress)
        for step in bar:
            first = step * opts.batch
            chunk = [sentences[(first + i) % len(sentences)] for i in range(opts.batch)]   # wraps around the list
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=opts.max_length, return_tensors="pt")
            with torch.no_grad():
                target = teacher(**enc).last_hidden_state                  # (B, T, D)
            hidden = student(**enc).last_hidden_state                      # (B, T, D), one output per input token
            loss = distill_loss(hidden, target, enc["attention_mask"], opts.token_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            bar.set_postfix(loss=f"{running:.4f}", kept=f"{stats(student)['kept_fraction']:.3f}")
            if step % 20 == 0 or step == opts.steps - 1:
                history.append({"step": step, "loss": loss.item()})
    finally:
        untrim(student)
    seconds = time.perf_counter() - start
    after = _dev_fidelity(student, teacher, tokenizer, dev, opts.config)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"options": asdict(opts), "train_sentences": len(sentences), "seconds": seconds,
              "dev_before": before, "dev_after": after, "history": history}
    (out / "merge_distill.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
