"""What answers the lines of a `trimformer batch` job, in one process or in each Ray actor: a valid line
(`Item`), what a worker needs to build its model (`Spec`), and the server's engine answering one item at a
time into an output record (`BatchEngine`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .api import stats
from .config import TrimConfig
from .errors import TrimformerError
from .generation import greedy
from .loading import load_model
from .serve import Engine
from .serve_api import RequestError, parse_request


@dataclass(frozen=True)
class Item:
    """One valid input line."""

    line: int                  # 1-based line number in the input file
    id: str | int
    request: dict[str, Any]    # "prompt" or "messages", and "max_tokens" when the line sets it


@dataclass(frozen=True)
class Spec:
    """What a worker needs to answer items: picklable, so Ray actors build their engine from it."""

    model: str                       # embedded name, local folder or hub id
    config: TrimConfig | None        # None: the full model
    max_new_tokens: int = 64         # for lines without max_tokens
    raw: bool = False                # prompts as they are, not wrapped in the chat template
    threads: int | None = None       # torch CPU threads (None: torch's choice)

    def engine(self) -> "BatchEngine":
        if self.threads:
            torch.set_num_threads(self.threads)
        model, tokenizer = load_model(self.model)
        return BatchEngine(model, tokenizer, self.config, self.max_new_tokens, self.raw)


class BatchEngine(Engine):
    """The server's engine, answering one item at a time in the caller's thread, greedily."""

    def __init__(self, model, tokenizer, config: TrimConfig | None, max_new_tokens: int, raw: bool = False):
        super().__init__(model, tokenizer, config, default_max_tokens=max_new_tokens)
        self.raw = raw

    def record(self, item: Item) -> dict[str, Any]:
        """The output record of `item`: its answer, or an error record (never raises for one item)."""
        try:
            return self._answer(item)
        except RequestError as exc:
            message = exc.message
        except TrimformerError as exc:
            message = str(exc)
        except Exception as exc:  # noqa: BLE001 - one line's failure is that line's error, the job goes on
            message = f"generation failed: {type(exc).__name__}: {exc}"
        return error_record(item.line, item.id, message)

    def _answer(self, item: Item) -> dict[str, Any]:
        job = parse_request(item.request, chat="messages" in item.request)
        if isinstance(job.prompt, str) and not self.raw and getattr(self.tokenizer, "chat_template", None):
            job.chat, job.prompt = True, [{"role": "user", "content": job.prompt}]    # as `trimformer generate`
        ids = self.encode(job)
        room = self.context - len(ids)
        wanted = item.request.get("max_tokens") or min(self.default_max_tokens, room)
        if not 1 <= wanted <= room:
            raise RequestError(400, f"this model's maximum context length is {self.context} tokens; the prompt "
                                    f"has {len(ids)} and max_tokens asks for {wanted} more", "max_tokens")
        trimmed = self.config is not None and len(ids) >= self.shortest_trimmed
        with self._full_model_if_short(len(ids)):
            out = greedy(self.model, torch.tensor([ids], device=self.device), wanted, self.tokenizer.eos_token_id)
            kept = stats(self.model)["kept_fraction"] if trimmed else 1.0
        return {"id": item.id, "answer": self.tokenizer.decode(out.tokens, skip_special_tokens=True),
                "ttft_s": round(out.ttft_s, 4), "kept_fraction": round(kept, 4), "prompt_tokens": len(ids),
                "new_tokens": len(out.tokens)}


def error_record(line: int, ident: Any, message: str) -> dict[str, Any]:
    return {"id": ident, "line": line, "error": message}
