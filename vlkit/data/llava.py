"""LLaVA-format data: records, safety and sanity checks, chat templating with label masks, images.

Record format (as in ``blip_laion_cc_sbu_558k.json`` and ``llava_v1_5_mix665k.json``)::

    {"id": "...", "image": "rel/path.jpg",            # optional: text-only samples have no "image"
     "conversations": [{"from": "human", "value": "<image>\\nQuestion?"}, {"from": "gpt", "value": "Answer."}, ...]}

Prompts go through the tokenizer's chat template. Supervised tokens are exactly the assistant turns (content plus
the template's end-of-turn token) of every turn; everything else is -100. Each ``<image>`` placeholder is expanded
to the model's M image-token ids, never cut by truncation.
"""
from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable

import torch
from PIL import Image, UnidentifiedImageError

IGNORE = -100
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file and record."""


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """A LLaVA JSON list (or JSON Lines) file."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file '{p}' does not exist")
    text = p.read_text()
    try:
        if p.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"data file '{p}' is not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise DataError(f"data file '{p}' must hold a JSON list of records, got {type(records).__name__}")
    return records


def record_id(rec: Any, index: int) -> str:
    return str(rec.get("id", f"#{index}")) if isinstance(rec, dict) else f"#{index}"


def safe_image_path(root: str | Path, rel: str) -> Path:
    """``root/rel``; raises if ``rel`` is absolute or escapes ``root`` (``../``, symlinks)."""
    root_r = Path(root).resolve()
    if Path(rel).is_absolute():
        raise DataError(f"image path '{rel}' is absolute; image paths must be relative to the image root")
    full = (root_r / rel).resolve()
    if not full.is_relative_to(root_r):
        raise DataError(f"image path '{rel}' escapes the image root {root_r}")
    return full


def structure_problems(rec: Any) -> list[str]:
    """Malformed-record problems (no I/O, no tokenizer)."""
    if not isinstance(rec, dict):
        return [f"record is a {type(rec).__name__}, not an object"]
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        return ["no conversations"]
    problems = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            problems.append(f"turn {i} has no text 'value'")
            continue
        if turn.get("from") not in ROLES:
            problems.append(f"turn {i} has unknown role '{turn.get('from')}' (expected human/gpt)")
    if problems:
        return problems
    roles = [ROLES[t["from"]] for t in conv if ROLES[t["from"]] != "system"]
    if roles and roles[0] != "user":
        problems.append("first turn is not from 'human'")
    if any(a == b for a, b in zip(roles, roles[1:])):
        problems.append("roles do not alternate human/gpt")
    if "assistant" not in roles:
        problems.append("no 'gpt' turn: nothing to learn from")
    n_ph = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conv)
    image = rec.get("image")
    if isinstance(image, list):
        problems.append("more than one image per sample is not supported (\"image\" is a list)")
    elif image is not None and not isinstance(image, str):
        problems.append("\"image\" must be a relative path string")
    elif image is not None and n_ph != 1:
        problems.append(f"{n_ph} <image> placeholders for 1 image (need exactly one, in the first human turn)")
    elif image is None and n_ph:
        problems.append(f"{n_ph} <image> placeholder(s) but the record has no \"image\"")
    elif image is not None and IMAGE_PLACEHOLDER not in conv[0]["value"] and roles:
        first_user = next(t for t in conv if ROLES[t["from"]] == "user")
        if IMAGE_PLACEHOLDER not in first_user["value"]:
            problems.append("<image> placeholder is not in the first human turn")
    return problems


def load_image(path: Path) -> Image.Image:
    """Open an image and convert grayscale / RGBA / palette / CMYK to RGB."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, im).convert("RGB")
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image '{path}' does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"image '{path}' is unreadable or corrupt: {exc}") from exc


def image_problem(path: Path, decode: bool = True) -> str | None:
    """Why ``path`` cannot be used, or None. ``decode``: read every pixel as training does (:func:`load_image`,
    which catches truncated files); otherwise PIL's ``verify()`` (headers only: fast, misses truncation)."""
    try:
        if decode:
            load_image(path)
        else:
            with Image.open(path) as im:
                im.verify()
    except DataError as exc:
        return str(exc.__cause__) if exc.__cause__ is not None else str(exc)
    except Exception as exc:  # PIL raises many types for corrupt files; each is reported per record
        return f"{type(exc).__name__}: {exc}"
    return None


def image_problems(paths: list[Path], decode: bool = True, workers: int = 1,
                   advance: Callable[[int], None] | None = None) -> list[str | None]:
    """:func:`image_problem` for each path, in order; in ``workers`` processes when more than one.

    ``advance(n)`` is called as results come in (for a progress bar)."""
    check = partial(image_problem, decode=decode)
    if workers <= 1 or len(paths) < 2:
        results = []
        for path in paths:
            results.append(check(path))
            if advance is not None:
                advance(1)
        return results
    chunk = max(1, min(64, len(paths) // (workers * 8)))
    results = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for res in pool.map(check, paths, chunksize=chunk):
            results.append(res)
            if advance is not None:
                advance(1)
    return results


class ImageTransform:
    """Resize shortest side (bicubic), centre crop, normalise with the encoder's own mean/std."""

    def __init__(self, image_size: int, mean, std) -> None:
        from torchvision.transforms import v2

        self.image_size = image_size
        self.t = v2.Compose([
            v2.PILToTensor(),
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        # PIL RGB -> [3, S, S]
        return self.t(image)

    def blank(self) -> torch.Tensor:
        """A zero image [3, S, S]: the stand-in for an image that failed to decode (trained with weight 0)."""
        return torch.zeros(3, self.image_size, self.image_size)


def to_messages(conversations: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in conversations]


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def template_segments(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, supervised) pieces: assistant turns are supervised.

    Uses only the chat template (prefix renders), so it works for any template that renders a conversation
    prefix as a prefix of the whole; otherwise it raises, naming the mismatch (the "loss is 0" bug).
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:k], add_generation_prompt=True)
        full = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                "the chat template does not render a conversation prefix as a prefix of the conversation, so "
                f"assistant turns cannot be located; prompt render:\n{prompt!r}\nfull render:\n{full!r}"
            )
        segments.append((prompt[len(done):], False))
        segments.append((full[len(prompt):], True))
        done = full
    rest = _render(tokenizer, messages, add_generation_prompt=False)[len(done):]
    if rest:
        segments.append((rest, False))
    return segments


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    image: str | None  # path relative to the image root
    index: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def image_span(image_token_id: int, image: int | Sequence[int]) -> list[int]:
    """The ids one ``<image>`` placeholder becomes: ``image`` image-token ids when it is a count, else the model's
    own span (``VLM.image_span``: the image tokens with a fusion's cell names between them)."""
    return [image_token_id] * image if isinstance(image, int) else list(image)


def tokenize_record(rec: dict[str, Any], tokenizer, image_token_id: int, num_image_tokens: int | Sequence[int],
                    max_length: int, index: int = 0) -> Example:
    """Template, tokenize, mask and expand one record (``num_image_tokens``: a count or the model's
    ``image_span``). Raises DataError (naming the record) when unusable."""
    rid = record_id(rec, index)
    messages = to_messages(rec["conversations"])
    ids: list[int] = []
    labels: list[int] = []
    for text, supervised in template_segments(tokenizer, messages):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if supervised else [IGNORE] * len(piece))
    n_img = ids.count(image_token_id)
    expected = 1 if rec.get("image") else 0
    if n_img != expected:
        raise DataError(f"record {rid}: tokenizer produced {n_img} image tokens for {expected} image(s); "
                        "is <image> registered as a special token?")
    if n_img and any(lab == image_token_id for lab in labels):
        raise DataError(f"record {rid}: <image> placeholder inside an assistant turn")
    if n_img:
        at = ids.index(image_token_id)
        span = image_span(image_token_id, num_image_tokens)
        ids[at:at + 1] = span
        labels[at:at + 1] = [IGNORE] * len(span)
        image_end = at + len(span)
    else:
        image_end = 0
    if len(ids) > max_length:
        if image_end >= max_length:
            raise DataError(f"record {rid}: {len(ids)} tokens, and the image tokens end at {image_end} > "
                            f"max_length {max_length}: truncation would cut the image")
        ids, labels = ids[:max_length], labels[:max_length]
    if not any(lab != IGNORE for lab in labels[1:]):
        raise DataError(f"record {rid}: no supervised token after templating and truncation (max_length "
                        f"{max_length})")
    return Example(ids, labels, rec.get("image"), index, record_meta(rec))


def record_meta(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec[k] for k in ("question_type", "answer", "id") if k in rec}


@dataclass
class Problem:
    index: int
    id: str
    kind: str
    message: str


def check_records(records: list[Any], image_root: str | Path | None, tokenizer=None, image_token_id: int | None = None,
                  num_image_tokens: int | Sequence[int] = 1, max_length: int = 10**9, open_images: bool = True,
                  decode_images: bool = False, workers: int = 1,
                  on_images: Callable[[int], None] | None = None,
                  advance: Callable[[int], None] | None = None,
                  memo: dict[int, dict[str, Any]] | None = None) -> tuple[list[Example], list[Problem]]:
    """Every check training relies on: structure, image paths and files, templating, length.

    ``open_images`` opens each image file: with ``decode_images`` every pixel is decoded as the training loader
    does (catches truncated files; ``workers`` processes), else headers only (PIL ``verify``). ``on_images(n)`` is
    told how many images will be opened, ``advance(k)`` as they are (for a progress bar). ``memo`` (record index ->
    tokenization, vlkit/data/tokenized.py) supplies records tokenized by an earlier run and takes the new ones.
    Returns the usable examples (tokenized when a tokenizer is given) and one Problem per bad record.
    """
    problems: list[Problem] = []
    paths, usable = _locate_images(records, image_root, problems)
    if open_images and paths:
        if on_images is not None:
            on_images(len(paths))
        found = image_problems(list(paths.values()), decode_images, workers, advance)
        broken = {i: msg for i, msg in zip(paths, found) if msg is not None}
        for i, msg in broken.items():
            problems.append(Problem(i, record_id(records[i], i), "image_corrupt",
                                    f"image '{records[i]['image']}' is unreadable: {msg}"))
        usable = [i for i in usable if i not in broken]
    good: list[Example] = []
    for i in usable:
        rec = records[i]
        if tokenizer is None:
            good.append(Example([], [], rec.get("image"), i))
            continue
        known = _tokenized(rec, i, tokenizer, image_token_id, num_image_tokens, max_length, memo)
        if "ids" in known:
            good.append(Example(list(known["ids"]), list(known["labels"]), rec.get("image"), i, record_meta(rec)))
        else:
            problems.append(Problem(i, record_id(rec, i), known["kind"], known["message"]))
    problems.sort(key=lambda p: p.index)  # stable: a record's own problems keep their order
    return good, problems


def _locate_images(records: list[Any], image_root: str | Path | None,
                   problems: list[Problem]) -> tuple[dict[int, Path], list[int]]:
    """Structure and image-path checks (problems appended): each image record's file, and the usable records."""
    paths: dict[int, Path] = {}
    usable: list[int] = []
    for i, rec in enumerate(records):
        rid = record_id(rec, i)
        bad = structure_problems(rec)
        if bad:
            problems.extend(Problem(i, rid, "malformed", b) for b in bad)
            continue
        if rec.get("image") is not None:
            if image_root is None:
                problems.append(Problem(i, rid, "no_image_root", "record has an image but no image root was given"))
                continue
            try:
                path = safe_image_path(image_root, rec["image"])
            except DataError as exc:
                problems.append(Problem(i, rid, "path_escapes_root", str(exc)))
                continue
            if not path.exists():
                problems.append(Problem(i, rid, "image_missing", f"image '{rec['image']}' not found under {image_root}"))
                continue
            paths[i] = path
        usable.append(i)
    return paths, usable


def _tokenized(rec: dict[str, Any], i: int, tokenizer, image_token_id: int | None,
               num_image_tokens: int | Sequence[int],
               max_length: int, memo: dict[int, dict[str, Any]] | None) -> dict[str, Any]:
    """A record templated: ``{"ids", "labels"}``, or ``{"kind", "message"}`` of why it cannot train (from ``memo``
    when an earlier run templated it; new results go into ``memo``)."""
    known = memo.get(i) if memo is not None else None
    if known is None:
        try:
            ex = tokenize_record(rec, tokenizer, image_token_id, num_image_tokens, max_length, i)
            known = {"ids": ex.input_ids, "labels": ex.labels}
        except DataError as exc:
            msg = str(exc)
            kind = "too_long" if "truncation would cut" in msg else "no_supervised_tokens" \
                if "no supervised" in msg else "template"
            known = {"kind": kind, "message": msg}
        if memo is not None:
            memo[i] = known
    return known


class LlavaDataset(torch.utils.data.Dataset):
    """Tokenized examples plus lazily loaded, preprocessed images.

    With ``keep_bad`` (training) an image that fails to decode does not raise inside a loader worker: the item comes
    back with a blank image and ``bad`` set to the reason, and the training process decides to skip or stop."""

    def __init__(self, examples: list[Example], image_root: str | Path | None, transform: ImageTransform,
                 load_images: bool = True, keep_bad: bool = False) -> None:
        self.examples, self.image_root, self.transform = examples, image_root, transform
        self.load_images = load_images  # False when a feature cache supplies the encoder outputs
        self.keep_bad = keep_bad

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.examples[i]
        path = safe_image_path(self.image_root, ex.image) if ex.image is not None else None
        pixel_values, bad = None, None
        if path is not None and self.load_images:
            try:
                pixel_values = self.transform(load_image(path))
            except DataError as exc:
                if not self.keep_bad:
                    raise DataError(f"record {example_id(ex)}: {exc}") from exc
                pixel_values, bad = self.transform.blank(), str(exc)
        return {"input_ids": ex.input_ids, "labels": ex.labels, "pixel_values": pixel_values, "index": ex.index,
                "image_key": None if path is None else str(path), "id": example_id(ex), "bad": bad}


def example_id(ex: Example) -> str:
    """The record's ``id`` (or ``#index`` when it has none), as in problem reports."""
    return str(ex.meta.get("id", f"#{ex.index}"))
