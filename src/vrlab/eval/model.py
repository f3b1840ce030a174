"""`VrlabLMM`: any saved VisionLanguageModel as an lmms-eval model.

Requests of one kind from every task arrive in one call. `generate_until` groups them by generation
arguments, sorts each group by prompt length (less padding), answers `batch_size` at a time and returns the
answers in request order; `loglikelihood` returns the *negative* log-likelihood, because lmms-eval's
multiple-choice scoring takes the argmin, wrapped in `GenerationResult` so lmms-eval keeps the tuple. A
request with more than one image, a video, or a multi-round conversation is refused with the task's name.
`clean()` keeps the model: lmms-eval's default deletes every module attribute after a run.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from tqdm import tqdm

from vrlab.errors import VrlabError
from vrlab.runtime import rank_device, resolve_device

log = logging.getLogger(__name__)


def _as_tensor(visual: Any, where: str) -> torch.Tensor:
    """A PIL image (what lmms-eval's doc_to_visual returns) as the uint8 [3, H, W] tensor vrlab models take."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    if isinstance(visual, Image.Image):
        return pil_to_tensor(visual.convert("RGB"))
    if torch.is_tensor(visual) and visual.dtype == torch.uint8 and visual.ndim == 3:
        return visual
    raise VrlabError(f"{where}: vrlab models take images; this task gives {type(visual).__name__}")


class VrlabLMM(lmms):
    """lmms-eval model over a vrlab checkpoint (`pretrained=<dir>`) or a model already in memory (`model=`)."""

    def __init__(
        self,
        pretrained: str | None = None,
        model: Any = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        image_aspect_ratio: str | None = None,
        max_new_tokens: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise VrlabError(
                f"unknown model_args for the vrlab model: {sorted(kwargs)}; it takes pretrained, "
                "image_aspect_ratio, max_new_tokens (and --batch_size, --device)"
            )
        if model is None:
            if not pretrained:
                raise VrlabError("the vrlab model needs pretrained=<folder written by vrlab stage 2>")
            from vrlab.mllm.model import VisionLanguageModel

            model = VisionLanguageModel.from_pretrained(Path(pretrained))
        try:
            self.batch_size_per_gpu = max(1, int(batch_size))
        except (TypeError, ValueError) as exc:
            raise VrlabError(f"batch_size={batch_size!r} must be a positive integer") from exc
        self.vlm = model.to(rank_device(resolve_device(device or "auto"))).eval()  # one GPU per rank
        self.aspect, self.max_new_tokens = image_aspect_ratio, int(max_new_tokens)

    # lmms-eval's harness reads these
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return next(self.vlm.parameters()).device

    def clean(self) -> None:
        """Keep the model between runs (the default deletes every nn.Module attribute)."""

    def _image_of(self, doc_to_visual: Callable[[Any], Any], doc_id: int, task: str, split: str) -> Any:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            raise VrlabError(
                f"task '{task}', doc {doc_id}: {len(visuals)} images in one request; vrlab models take one "
                "image per prompt"
            )
        return _as_tensor(visuals[0], f"task '{task}', doc {doc_id}") if visuals else None

    def _batches(self, order: Sequence[int]) -> list[list[int]]:
        n = self.batch_size_per_gpu
        return [list(order[i : i + n]) for i in range(0, len(order), n)]

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        answers: list[str | None] = [None] * len(requests)
        from vrlab.mllm.inference import generate_answers

        bar = tqdm(total=len(requests), desc="vrlab generate", disable=len(requests) < 2)
        for indices in groups.values():
            gen = dict(requests[indices[0]].args[1] or {})
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            gen.setdefault("max_new_tokens", self.max_new_tokens)
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for chunk in self._batches(indices):
                images = [self._image_of(*requests[i].args[2:6]) for i in chunk]
                prompts = [requests[i].args[0] for i in chunk]
                for i, text in zip(
                    chunk, generate_answers(self.vlm, images, prompts, gen, until, self.aspect), strict=True
                ):
                    answers[i] = text
                bar.update(len(chunk))
        bar.close()
        return [a if a is not None else "" for a in answers]

    def loglikelihood(self, requests: Sequence[Any]) -> list[Any]:
        from vrlab.mllm.inference import answer_loglikelihoods

        out: list[Any] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        bar = tqdm(total=len(requests), desc="vrlab loglikelihood", disable=len(requests) < 2)
        for chunk in self._batches(order):
            images = [self._image_of(*requests[i].args[2:6]) for i in chunk]
            prompts = [requests[i].args[0] for i in chunk]
            answers = [str(requests[i].args[1]).strip() for i in chunk]
            for i, (ll, greedy) in zip(
                chunk, answer_loglikelihoods(self.vlm, images, prompts, answers, self.aspect), strict=True
            ):
                out[i] = GenerationResult(text=(-ll, greedy))  # argmin picks the most likely choice
            bar.update(len(chunk))
        bar.close()
        return out

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        task = requests[0].args[-2] if requests else "?"
        raise VrlabError(f"task '{task}' is multi-round; vrlab models answer single-turn prompts")
