"""lmms-eval model wrapping a vlkit run directory (or a ``vlkit``-format export).

Installed with ``pip install 'vlkit[lmms]'``; vlkit registers it through the ``lmms_eval.models`` entry-point group,
so lmms-eval finds it by name::

    lmms-eval --model vlkit --model_args run=runs/mlp_patch --tasks mme --batch_size 8

``--model_args``: ``run`` (or ``pretrained``) = a run directory or a vlkit export (anything
:func:`vlkit.export.load_model` takes); ``max_new_tokens`` (default 32, used when a task sets none);
``system_prompt`` (text, or a file holding it); ``lstrip_continuation`` (default true, see :meth:`loglikelihood`).
``--batch_size N`` batches N requests per forward pass; ``--device`` overrides the device the run's recipe picks.

Prompts are exactly what vlkit's own evaluation builds (:func:`vlkit.evaluate.prompt_example`): the task's context
as one user turn through the LLM's chat template (generation prompt added), ``<image>`` placeholders expanded to the
model's image tokens. When the context has no ``<image>`` placeholder, one ``<image>\\n`` per visual is put in front
of it (LLaVA's convention, as in vlkit's data). Images go through the encoder's own preprocessing
(:class:`vlkit.data.llava.ImageTransform`: resize, centre crop, the encoder's mean/std).

This module needs lmms-eval; ``import vlkit`` never imports it.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as exc:  # pragma: no cover - exercised by a test that hides lmms_eval
    raise ImportError(
        "vlkit.lmms_eval_adapter needs lmms-eval (lmms_eval.api.model could not be imported: "
        f"{exc}); install it with `pip install 'vlkit[lmms]'` (or `pip install lmms-eval`)"
    ) from exc

import torch

log = logging.getLogger("vlkit.lmms_eval")

MODEL_ID = "vlkit"
CLASS_PATH = "vlkit.lmms_eval_adapter.VlkitLMM"
IGNORE = -100


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's registry (``ModelRegistryV2``) calls it for the manifest."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def _to_rgb(image):
    """A PIL image as RGB, transparency composited on white (as :func:`vlkit.data.llava.load_image` does)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return image.convert("RGB")


def _flatten(visuals: Any) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    out = []
    for v in visuals:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else ([] if v is None else [v]))
    return out


def _int_arg(value: Any, name: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("%s=%s: automatic batch sizes are not supported by the vlkit model; using %d", name, value,
                    default)
        return default
    return int(value)


def _gen_key(gen_kwargs: dict[str, Any]) -> str:
    return json.dumps(gen_kwargs, sort_keys=True, default=str)


def truncate_at(text: str, until: Iterable[str]) -> str:
    """``text`` up to the earliest occurrence of any (non-empty) stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


class VlkitLMM(lmms):
    """A trained vlkit model for lmms-eval (``--model vlkit --model_args run=RUN_DIR``)."""

    is_simple = True

    def __init__(self, run: str | None = None, batch_size: int | str = 1, max_new_tokens: int = 32,
                 device: str | None = None, system_prompt: str | None = None, lstrip_continuation: bool = True,
                 pretrained: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        from vlkit.data.llava import ImageTransform
        from vlkit.export import load_model

        path = run if run is not None else pretrained
        if path is None:
            raise ValueError("the vlkit lmms-eval model needs a run: --model_args run=RUN_DIR (a vlkit run "
                             "directory or a vlkit-format export)")
        unused = {k: v for k, v in kwargs.items() if v is not None and k != "max_batch_size"}
        if unused:
            log.warning("vlkit model: ignoring unknown model arguments %s", sorted(unused))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            log.warning("the vlkit model runs in one process; with WORLD_SIZE=%s every process would evaluate "
                        "every request: launch lmms-eval without accelerate/torchrun", os.environ["WORLD_SIZE"])
        model, recipe, dev = load_model(path)
        if device is not None:
            dev = torch.device(device)
            model = model.to(dev)
        self._model, self.recipe, self._device = model.eval(), recipe, dev
        self.run = str(path)
        self.batch_size_per_gpu = max(1, _int_arg(batch_size, "batch_size", 1))
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        self.lstrip_continuation = bool(lstrip_continuation)
        enc = model.encoder
        self.transform = ImageTransform(enc.image_size, enc.mean, enc.std)
        self.image_token = getattr(model.llm, "image_token", "<image>")
        self._warned: set[str] = set()

    # ---- properties lmms-eval models usually expose ----------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._model.tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False)["input_ids"]

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # ---- inputs ----------------------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int):
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as exc:
            raise KeyError(f"lmms-eval gave no document {doc_id} of task '{task}' split '{split}' "
                           "(model.task_dict is filled by lmms_eval.evaluator)") from exc

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        if doc_to_visual is None:
            return []
        visuals = _flatten(doc_to_visual(self._doc(task, split, doc_id)))
        from PIL import Image

        for v in visuals:
            if not isinstance(v, Image.Image):
                kind = "a video/file path" if isinstance(v, str) else type(v).__name__
                raise ValueError(f"task '{task}' doc {doc_id}: the vlkit model takes images (PIL), got {kind}; "
                                 "video and audio tasks are not supported")
        return visuals

    def prompt_ids(self, context: str, n_images: int) -> list[int]:
        """The context as vlkit's generation prompt: one user turn through the chat template, each image
        placeholder expanded to the model's image tokens (``image_span``: none with cross-attention)."""
        model, tok = self._model, self.tokenizer
        placeholders = context.count(self.image_token)
        if placeholders == 0 and n_images:
            context = f"{self.image_token}\n" * n_images + context
        elif placeholders != n_images:
            raise ValueError(f"the context has {placeholders} {self.image_token} placeholder(s) but the document "
                             f"has {n_images} image(s)")
        if n_images > 1 and not model.fusion.in_sequence:
            raise ValueError(f"{n_images} images in one request: the run's '{self.recipe.fusion.name}' fusion "
                             "takes one image per sample")
        messages = [{"role": "user", "content": context}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        image_id = model.image_token_id
        if ids.count(image_id) != n_images:
            raise ValueError(f"the tokenizer produced {ids.count(image_id)} image tokens for {n_images} image(s)")
        span = model.image_span
        out: list[int] = []
        for i in ids:
            out.extend(span if i == image_id else [i])
        return out

    def _pixels(self, images: list) -> torch.Tensor:
        # PIL images -> [I, 3, S, S]
        return torch.stack([self.transform(_to_rgb(im)) for im in images])

    def _batch(self, rows: list[tuple[list[int], list[int], list]], left_pad: bool) -> dict[str, Any]:
        """(input_ids, labels, images) per row -> padded tensors on the device; images in row order."""
        pad = self.tokenizer.pad_token_id
        longest = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        images, image_index = [], []
        for b, (row_ids, row_labels, row_images) in enumerate(rows):
            n = len(row_ids)
            sl = slice(longest - n, longest) if left_pad else slice(0, n)
            ids[b, sl] = torch.as_tensor(row_ids)
            labels[b, sl] = torch.as_tensor(row_labels)
            mask[b, sl] = 1
            images.extend(row_images)
            image_index.extend([b] * len(row_images))
        dev = self._device
        return {"input_ids": ids.to(dev), "labels": labels.to(dev), "attention_mask": mask.to(dev),
                "pixel_values": self._pixels(images).to(dev) if images else None,
                "image_index": torch.tensor(image_index, dtype=torch.long, device=dev)}

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # ---- lmms API --------------------------------------------------------------------------------------------
    def _gen_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {type(until).__name__}")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = gen_kwargs.get("do_sample")
        do_sample = temperature > 0 if do_sample is None else bool(do_sample)
        if do_sample and temperature <= 0:
            self._warn_once("t0", "do_sample=True with temperature %s: generating greedily", temperature)
            do_sample = False
        top_p = gen_kwargs.get("top_p")
        if int(gen_kwargs.get("num_beams") or 1) > 1:
            self._warn_once("beams", "num_beams=%s: the vlkit model does not do beam search; using 1 beam",
                            gen_kwargs.get("num_beams"))
        max_new = gen_kwargs.get("max_new_tokens")
        settings = {"max_new_tokens": int(max_new) if max_new is not None else self.max_new_tokens,
                    "do_sample": do_sample, "temperature": temperature if do_sample else 1.0,
                    "top_p": float(top_p) if (do_sample and top_p is not None) else 1.0}
        return [str(u) for u in until], settings

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Each request's args are ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``. Generation stops
        at the model's end of turn or ``max_new_tokens``; the text is cut at the earliest ``until`` string, then
        stripped (as vlkit's ``generate_answers`` strips)."""
        from tqdm import tqdm

        prepared: dict[str, list[int]] = {}
        rows: list[tuple[list[int], list]] = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args[:6]
            images = self._visuals(doc_to_visual, task, split, doc_id)
            rows.append((self.prompt_ids(context, len(images)), images))
            prepared.setdefault(_gen_key(gen_kwargs or {}), []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="vlkit generate")
        for idx in prepared.values():
            gen_kwargs = dict(requests[idx[0]].args[1] or {})
            until, settings = self._gen_settings(gen_kwargs)
            order = sorted(idx, key=lambda j: -len(rows[j][0]))  # similar lengths together, less padding
            for start in range(0, len(order), self.batch_size_per_gpu):
                chunk = order[start:start + self.batch_size_per_gpu]
                batch = self._batch([(rows[j][0], [IGNORE] * len(rows[j][0]), rows[j][1]) for j in chunk],
                                    left_pad=True)
                out = self._model.generate(batch["input_ids"], batch["attention_mask"],
                                           pixel_values=batch["pixel_values"], image_index=batch["image_index"],
                                           **settings)
                texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
                for j, text in zip(chunk, texts):
                    answer = truncate_at(text, until).strip()
                    results[j] = answer
                    self.cache_hook.add_partial("generate_until", (requests[j].args[0], gen_kwargs), answer)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Each request's args are ``(context, continuation, doc_to_visual, doc_id, task, split)``;
        ``continuation`` is a string or ``doc_to_target`` (called on the document). Returns (sum of the
        continuation tokens' log-probabilities, whether greedy decoding would produce exactly those tokens).

        The context is the same prompt :meth:`generate_until` uses (ending with the chat template's assistant
        header); the continuation's tokens follow it directly, with no end-of-turn token. With
        ``lstrip_continuation`` (default) leading whitespace of the continuation is dropped: it is lmms-eval's
        ``target_delimiter`` (" ") between context and choice, which the assistant header already separates
        (lm-evaluation-harness drops the delimiter for chat-templated models too)."""
        from tqdm import tqdm

        items: list[tuple[list[int], list[int], list]] = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args[:6]
            if isinstance(target, str):
                continuation = target
            else:
                continuation = target(self._doc(task, split, doc_id)) if callable(target) else target
                if isinstance(continuation, (list, tuple)):
                    continuation = continuation[0]
                continuation = str(continuation)
            if self.lstrip_continuation:
                continuation = continuation.lstrip()
            images = self._visuals(doc_to_visual, task, split, doc_id)
            items.append((self.prompt_ids(context, len(images)), self.tok_encode(continuation), images))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)  # empty continuation: log 1, greedy
        todo = sorted((i for i, it in enumerate(items) if it[1]), key=lambda i: -(len(items[i][0]) + len(items[i][1])))
        bar = tqdm(total=len(todo), disable=self.rank != 0, desc="vlkit loglikelihood")
        for start in range(0, len(todo), self.batch_size_per_gpu):
            chunk = todo[start:start + self.batch_size_per_gpu]
            rows = [(ctx + cont, [IGNORE] * len(ctx) + cont, imgs) for ctx, cont, imgs in (items[i] for i in chunk)]
            batch = self._batch(rows, left_pad=False)
            out = self._model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                              pixel_values=batch["pixel_values"], image_index=batch["image_index"],
                              return_logits=True)
            # out.logits [S, V]: the supervised positions in row-major order, i.e. each row's continuation in turn
            logits = out.logits
            targets = torch.cat([torch.as_tensor(items[i][1]) for i in chunk]).to(logits.device)
            logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
            hit = logits.argmax(-1) == targets
            at = 0
            for i in chunk:
                n = len(items[i][1])
                results[i] = (float(logp[at:at + n].sum()), bool(hit[at:at + n].all()))
                at += n
            bar.update(len(chunk))
        bar.close()
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the vlkit lmms-eval model does not implement multi-round generation "
                                  "(generate_until_multi_round); use single-round generate_until or "
                                  "loglikelihood tasks")
