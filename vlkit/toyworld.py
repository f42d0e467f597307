"""The embedded default: a shapes dataset plus a toy tokenizer, toy-clip and toy-lm, built once into a cache.

``build_toy_world`` writes, deterministically from a seed::

    <root>/data/          the shapes world (vlkit.data.toy): images, LLaVA align/instruct JSON, scene annotations
    <root>/tokenizer/     byte-level BPE trained on the toy corpus, ChatML template (as Qwen2.5)
    <root>/toy-clip/      HF CLIPModel (64x64, patch 8) trained contrastively on position-free captions,
                          with its CLIPImageProcessor
    <root>/toy-lm/        HF Qwen2ForCausalLM pretrained on scene descriptions + questions as chat text, with
                          the tokenizer and a generation config that stops at <|im_end|>
    <root>/report.json    build times and quality probes (perplexity, retrieval, linear probes)
    <root>/build.json     the build config and its hash; a matching marker means "already built"

Everything runs offline on CPU. ``resolve_toy("toy:clip")`` (and ``toy:lm``, ``toy:tokenizer``, ``toy:data``,
``toy:data/<path>``) returns a local path, building the world on first use.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from vlkit._proc import peak_rss_mb
from vlkit.data import toy

WORLD_VERSION = 2  # bump when the build code changes what gets built (the cache key is the build config)
ENV_DIR = "VLKIT_TOY_DIR"
ENV_PRESET = "VLKIT_TOY_PRESET"
ENV_THREADS = "VLKIT_TOY_THREADS"
ENV_PARALLEL = "VLKIT_TOY_PARALLEL"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
DEFAULT_SYSTEM = "You are a helpful assistant."
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Qwen2.5's ChatML template (without tools). Content may be a string or a list of {"type": "text"|"image"} parts;
# image parts render as the <image> placeholder. Assistant content is wrapped in {% generation %} so that
# apply_chat_template(..., return_assistant_tokens_mask=True) marks the supervised tokens.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part.type == 'image' -%}{{- '<image>' -}}{%- elif part.type == 'text' -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + render(messages[0].content) + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message.role == 'system') -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{% generation %}{{- render(message.content) + '<|im_end|>' -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + render(message.content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Step counts are fixed (not time budgets) so that a seed fixes the weights. The default preset was sized to
# about 5 minutes on 2 CPU cores (see docs/toyworld.md); "tiny" is for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        n_train=20000, n_val=1000, n_test=1000,
        clip_steps=200, clip_batch=128, clip_lr=2e-3,
        lm_steps=1500, lm_batch=32, lm_lr=3e-3,
        probe_train=3000, probe_epochs=300,
    ),
    "tiny": dict(
        n_train=400, n_val=160, n_test=40,
        clip_steps=12, clip_batch=32, clip_lr=2e-3,
        lm_steps=12, lm_batch=16, lm_lr=3e-3,
        probe_train=300, probe_epochs=100,
    ),
}
CLIP_ARCH = dict(
    vision=dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4),
    text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=48),
    projection_dim=128,
)
# Width 128 rather than 256: ~3x cheaper per step. At equal CPU time (900 vs 300 steps) it answered more questions
# from text (0.44 vs 0.38); the default's 1 500 steps (~5 min of one core) reach 0.47, and VLM steps are ~3x faster.
LM_ARCH = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=352, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0)


@dataclass
class ToyWorld:
    """Paths of a built toy world and its build report."""

    root: Path
    data_dir: Path
    tokenizer_dir: Path
    clip_dir: Path
    lm_dir: Path
    report: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def at(cls, root: str | os.PathLike) -> "ToyWorld":
        root = Path(root)
        report_path = root / "report.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        return cls(root, root / "data", root / "tokenizer", root / "toy-clip", root / "toy-lm", report)


# ---- configuration --------------------------------------------------------------------------------------------
def _default_root(preset: str) -> Path:
    try:
        from platformdirs import user_cache_dir

        base = Path(user_cache_dir("vlkit"))
    except ImportError:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlkit"
    return base / (f"toyworld-v{WORLD_VERSION}" + ("" if preset == "default" else f"-{preset}"))


def toy_cache_dir(preset: str = "default") -> Path:
    """Where the toy world lives: ``$VLKIT_TOY_DIR`` if set, else ``~/.cache/vlkit/toyworld-v2`` (presets other
    than "default" get a ``-<preset>`` suffix there)."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else _default_root(preset)


def _env_preset() -> str:
    return os.environ.get(ENV_PRESET) or "default"


def build_config(seed: int = 0, preset: str = "default") -> dict[str, Any]:
    """Everything that determines the built files; its hash names a build."""
    if preset not in PRESETS:
        raise ValueError(f"unknown toy world preset '{preset}'; valid: {', '.join(PRESETS)}")
    return {"world_version": WORLD_VERSION, "data_format": toy.FORMAT_VERSION, "seed": seed, "preset": preset,
            **PRESETS[preset], "clip_arch": CLIP_ARCH, "lm_arch": LM_ARCH}


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def is_built(root: str | os.PathLike, seed: int = 0, preset: str = "default") -> bool:
    marker = Path(root) / "build.json"
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("hash") == config_hash(build_config(seed, preset))
    except (OSError, ValueError):
        return False


# ---- public entry points --------------------------------------------------------------------------------------
def build_toy_world(cache_dir: str | os.PathLike | None = None, *, seed: int = 0, preset: str = "default",
                    force: bool = False, console: Any = None) -> ToyWorld:
    """Build the toy world into ``cache_dir`` (default ``toy_cache_dir(preset)``) unless a build with the same
    config is already there. Builds into a temporary sibling directory, then renames it into place."""
    config = build_config(seed, preset)
    root = Path(cache_dir) if cache_dir is not None else toy_cache_dir(preset)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        if not force and is_built(root, seed, preset):
            return ToyWorld.at(root)
        for stale in [*root.parent.glob(f".{root.name}.building-*"), *root.parent.glob(f".{root.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted build (we hold the lock)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
        tmp.chmod(0o755)
        try:
            report = _build(tmp, config, console)
            (tmp / "report.json").write_text(json.dumps(report, indent=2))
            (tmp / "build.json").write_text(json.dumps({"hash": config_hash(config), "config": config}, indent=2))
            if root.exists():
                old = root.parent / f".{root.name}.old-{os.getpid()}"
                root.rename(old)
                tmp.rename(root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return ToyWorld.at(root)


def ensure_toy_world(cache_dir: str | os.PathLike | None = None, *, seed: int = 0, preset: str | None = None,
                     console: Any = None) -> ToyWorld:
    """The toy world, built first if needed (preset defaults to ``$VLKIT_TOY_PRESET`` or "default")."""
    preset = preset or _env_preset()
    root = Path(cache_dir) if cache_dir is not None else toy_cache_dir(preset)
    if is_built(root, seed, preset):
        return ToyWorld.at(root)
    console = console or _console()
    console.print(f"building the toy world (first use) into {root}")
    return build_toy_world(root, seed=seed, preset=preset, console=console)


_NAMES = {"clip": "clip_dir", "lm": "lm_dir", "tokenizer": "tokenizer_dir", "data": "data_dir"}


def resolve_toy(spec: str) -> str:
    """``toy:clip|lm|tokenizer|data`` or ``toy:data/<relative path>`` -> a local path (building on first use);
    any other string is returned unchanged."""
    if not isinstance(spec, str) or not spec.startswith("toy:"):
        return spec
    name = spec[len("toy:"):]
    head, _, rest = name.partition("/")
    if head not in _NAMES or (rest and head != "data"):
        valid = ", ".join(f"toy:{n}" for n in _NAMES) + ", toy:data/<path>"
        raise ValueError(f"unknown toy world reference '{spec}'; valid: {valid}")
    world = ensure_toy_world()
    path = getattr(world, _NAMES[head])
    return str(path / rest) if rest else str(path)


# ---- building -------------------------------------------------------------------------------------------------
def _console():
    from rich.console import Console

    return Console(stderr=True)


def _lock(root: Path):
    """One builder per target directory at a time."""
    from vlkit._locks import locked

    return locked(root.parent / f".{root.name}.lock")


def build_threads() -> int:
    """Torch threads per training job: ``$VLKIT_TOY_THREADS``, else 1. The count is fixed because toy-clip's
    weights depend on it (float reduction order); with one thread per job the two jobs share 2 cores without the
    spin-wait slowdown that 2-thread jobs suffer on a busy machine (3-4x measured)."""
    env = os.environ.get(ENV_THREADS)
    return max(1, int(env)) if env else 1


def _tune_malloc() -> bool:
    """Keep freed memory in the heap instead of returning it to the OS (glibc only). Small models re-allocate the
    same few-MB activations every step; on VMs where each fresh page costs a fault this is ~2-3x faster."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
        return bool(ok and libc.mallopt(m_top_pad, 64 << 20))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def _quiet_runtime(threads: int) -> Iterator[None]:
    """Fixed torch threads; transformers' progress bars and load reports off (restored afterwards)."""
    import torch
    from transformers.utils import logging as hf_logging

    old_threads, old_level = torch.get_num_threads(), hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        hf_logging.set_verbosity(old_level)
        if bars:
            hf_logging.enable_progress_bar()


def _clip_job(out: Path, cfg: dict[str, Any], update: Callable[..., None]) -> dict[str, Any]:
    """Train toy-clip, then probe it (retrieval, linear probes)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    data_dir, clip_dir = out / "data", out / "toy-clip"
    t, c = time.perf_counter(), time.process_time()
    stats = train_clip(data_dir, tok, clip_dir, cfg, update)
    t_train, c_train = time.perf_counter() - t, time.process_time() - c
    update(cfg["clip_steps"], "probing")
    t, c = time.perf_counter(), time.process_time()
    stats["retrieval_top1_batch100"] = probe_retrieval(clip_dir, data_dir, tok)
    probes = probe_features(clip_dir, data_dir, cfg)
    return {"toy_clip": stats, "linear_probes": probes,
            "seconds": {"toy-clip": t_train, "toy-clip probes": time.perf_counter() - t},
            "cpu_seconds": {"toy-clip": c_train, "toy-clip probes": time.process_time() - c}}


def _lm_job(out: Path, cfg: dict[str, Any], update: Callable[..., None]) -> dict[str, Any]:
    """Train toy-lm, then probe it (perplexity, answers from scene text)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    t, c = time.perf_counter(), time.process_time()
    stats = train_lm(tok, out / "toy-lm", cfg, update)
    t_train, c_train = time.perf_counter() - t, time.process_time() - c
    update(cfg["lm_steps"], "probing")
    t, c = time.perf_counter(), time.process_time()
    stats.update(probe_lm(out / "toy-lm", out / "data"))
    return {"toy_lm": stats, "seconds": {"toy-lm": t_train, "toy-lm probes": time.perf_counter() - t},
            "cpu_seconds": {"toy-lm": c_train, "toy-lm probes": time.process_time() - c}}


_JOBS = {"toy-clip": _clip_job, "toy-lm": _lm_job}


def _job_main(name: str, out: str, cfg: dict[str, Any], threads: int, step, info, queue) -> None:
    """Entry point of a job process: runs ``_JOBS[name]`` and puts ("ok", result) or ("error", traceback)."""
    import traceback

    try:
        _tune_malloc()
        with _quiet_runtime(threads):
            def update(done: int, text: str = "") -> None:
                info.value = text.encode()[:63]
                step.value = done

            result = _JOBS[name](Path(out), cfg, update)
            result["peak_rss_mb"] = {name: round(peak_rss_mb(), 1)}
            queue.put(("ok", result))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        queue.put(("error", traceback.format_exc()))


def _run_jobs(out: Path, cfg: dict[str, Any], threads: int, parallel: bool,
              updates: dict[str, Callable[..., None]]) -> list[dict[str, Any]]:
    """toy-clip and toy-lm are independent: each trains in its own single-threaded process, side by side (one
    thread each is both faster than two contending threads and reproducible: weights depend on the thread count)."""
    if not parallel:
        results = []
        with _quiet_runtime(threads):
            for name, job in _JOBS.items():
                results.append(job(out, cfg, updates[name]))
        return results
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    procs = {}
    for name in _JOBS:
        step, info, q = ctx.Value("i", 0), ctx.Array("c", 64), ctx.Queue()
        p = ctx.Process(target=_job_main, args=(name, str(out), cfg, threads, step, info, q), daemon=True)
        p.start()
        procs[name] = (p, step, info, q)
    results: dict[str, Any] = {}
    try:
        while len(results) < len(procs):
            for name, (p, step, info, q) in procs.items():
                if name in results:
                    continue
                updates[name](step.value, info.value.decode(errors="replace"))
                try:
                    status, payload = q.get(timeout=0.1)
                except queue_mod.Empty:
                    if not p.is_alive() and q.empty():
                        raise RuntimeError(f"toy world: the {name} process died (exit code {p.exitcode})")
                    continue
                if status == "error":
                    raise RuntimeError(f"toy world: building {name} failed:\n{payload}")
                results[name] = payload
                updates[name](step.value, "done")
    finally:
        for p, *_ in procs.values():
            if p.is_alive():
                p.terminate()
            p.join()
    return [results[name] for name in _JOBS]


def _build(out: Path, cfg: dict[str, Any], console: Any) -> dict[str, Any]:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = console or _console()
    seed = cfg["seed"]
    times: dict[str, float] = {}
    threads = build_threads()
    parallel = (os.cpu_count() or 1) >= 2 and os.environ.get(ENV_PARALLEL, "1") != "0"
    report: dict[str, Any] = {"seed": seed, "preset": cfg["preset"], "threads_per_job": threads,
                              "parallel_jobs": parallel, "malloc_tuned": _tune_malloc()}
    t_all = time.perf_counter()
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console) as progress, _quiet_runtime(threads):

        def phase(name: str, total: int) -> Callable[..., None]:
            task = progress.add_task(name, total=total, info="")

            def update(done: int, info: str = "") -> None:
                progress.update(task, completed=done, info=info)

            return update

        t = time.perf_counter()
        data_dir = out / "data"
        up = phase("data", cfg["n_train"] + cfg["n_val"] + cfg["n_test"])
        toy.generate_toy_data(data_dir, n_train=cfg["n_train"], n_val=cfg["n_val"], n_test=cfg["n_test"], seed=seed,
                              progress=lambda done, total: up(done))
        times["data"] = time.perf_counter() - t

        t = time.perf_counter()
        up = phase("tokenizer", 1)
        tok = build_tokenizer(data_dir, out / "tokenizer")
        up(1, f"vocab {len(tok)}")
        times["tokenizer"] = time.perf_counter() - t

        t = time.perf_counter()
        updates = {"toy-clip": phase("toy-clip", cfg["clip_steps"]), "toy-lm": phase("toy-lm", cfg["lm_steps"])}
        cpu: dict[str, float] = {}
        rss: dict[str, float] = {}
        for result in _run_jobs(out, cfg, threads, parallel, updates):
            times.update(result.pop("seconds"))
            cpu.update(result.pop("cpu_seconds"))
            rss.update(result.pop("peak_rss_mb", {}))
            report.update(result)
        times["models + probes (wall)"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all
    report["build_seconds"] = {k: round(v, 1) for k, v in times.items()}
    # CPU time of each job (its own process): the work, independent of how busy the machine was
    report["job_cpu_seconds"] = {k: round(v, 1) for k, v in cpu.items()}
    # peak RSS of each job's own process (absent when the jobs ran in the calling process: see its own figure)
    if rss:
        report["job_peak_rss_mb"] = rss
    report["machine"] = {"cpu_count": os.cpu_count(), "load_avg_1min_at_end": _loadavg()}
    return report


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---- tokenizer ------------------------------------------------------------------------------------------------
def _corpus(data_dir: Path) -> Iterator[str]:
    for split in ("train",):
        for rec in json.loads((data_dir / f"align_{split}.json").read_text()):
            for turn in rec["conversations"]:
                yield turn["value"].replace("<image>\n", "")
        for rec in json.loads((data_dir / f"instruct_{split}.json").read_text()):
            for turn in rec["conversations"]:
                yield turn["value"].replace("<image>\n", "")
    for _ in range(100):  # the chat template's fixed text, so that its words become single tokens
        yield f"system\n{DEFAULT_SYSTEM}\nuser\nScene: \nassistant\n"
    for shape in toy.SHAPES:
        yield f"{toy.plural(shape)} and {shape}"
    yield " ".join(str(i) for i in range(10))


def build_tokenizer(data_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None):
    """Byte-level BPE trained on the toy corpus, wrapped as a ``PreTrainedTokenizerFast`` with ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_corpus(Path(data_dir)), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>"], model_max_length=2048,
        clean_up_tokenization_spaces=False, padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


# ---- toy-clip -------------------------------------------------------------------------------------------------
def _load_images(data_dir: Path, records: list[dict]) -> "torch.Tensor":
    import torch
    from PIL import Image

    arr = np.stack([np.asarray(Image.open(data_dir / "images" / r["image"]).convert("RGB")) for r in records])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W] uint8


def _normalize(images_u8: "torch.Tensor") -> "torch.Tensor":
    import torch

    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


def _clip_text(tok, captions: list[str]) -> dict[str, "torch.Tensor"]:
    enc = tok([c + tok.eos_token for c in captions], padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def train_clip(data_dir: Path, tok, out_dir: Path, cfg: dict[str, Any], update: Callable[..., None]) -> dict:
    """Contrastive pretraining of a tiny CLIPModel on position-free captions (objects in random order);
    saves model + image processor (+ tokenizer, for the text tower)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    seed = cfg["seed"]
    torch.manual_seed(seed)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), eos_token_id=eos, pad_token_id=eos, bos_token_id=eos,
                         **CLIP_ARCH["text"]),
        vision_config=dict(**CLIP_ARCH["vision"]),
        projection_dim=CLIP_ARCH["projection_dim"],
    )
    model = CLIPModel(config)
    scenes = toy.load_scenes(data_dir, "train")
    images = _load_images(data_dir, scenes)
    objs = [[toy.Obj(o["shape"], o["colour"], o["row"], o["col"], o["size"], 0, 0) for o in s["objects"]]
            for s in scenes]
    rng = np.random.default_rng([seed, 101])
    steps, batch = cfg["clip_steps"], cfg["clip_batch"]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["clip_lr"], weight_decay=0.05, betas=(0.9, 0.98))
    model.train()
    losses = []
    for step in range(steps):
        idx = rng.choice(len(scenes), size=batch, replace=False)
        caps = [toy.clip_caption(objs[i], rng) for i in idx]
        pixels = images[torch.from_numpy(idx)]
        lr = _cosine_lr(step, steps, cfg["clip_lr"], max(1, steps // 10))
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(pixel_values=_normalize(pixels), **_clip_text(tok, caps), return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
        update(step + 1, f"loss {np.mean(losses[-10:]):.3f}")
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    size = CLIP_ARCH["vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_resize=True, do_center_crop=True
                       ).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"params_vision": sum(p.numel() for p in model.vision_model.parameters()),
            "params_total": sum(p.numel() for p in model.parameters()),
            "train_loss_first": round(float(np.mean(losses[:10])), 4),
            "train_loss_last": round(float(np.mean(losses[-10:])), 4)}


# ---- toy-lm ---------------------------------------------------------------------------------------------------
def _scene_messages(objs: list, grid: int, qas: list[tuple[str, str, str]]) -> list[dict[str, str]]:
    msgs = []
    for k, (_, q, a) in enumerate(qas):
        content = f"Scene: {toy.caption(objs, grid)}. {q}" if k == 0 else q
        msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
    return msgs


def lm_texts(n: int, seed: int, grid: int = 3, max_objects: int = 4) -> list[str]:
    """Chat conversations (as plain message lists) for LM pretraining: scene description + questions, and
    caption prompts answered with a caption. Scenes are drawn from the train split's share of descriptions."""
    rng = np.random.default_rng([seed, 202])
    convs = []
    while len(convs) < n:
        objs = toy.sample_scene(rng, grid, max_objects)
        if toy.split_of(toy.caption(objs, grid)) != "train":
            continue
        if rng.random() < 0.2:
            prompt = toy.CAPTION_PROMPTS[int(rng.integers(len(toy.CAPTION_PROMPTS)))]
            convs.append([{"role": "user", "content": prompt},
                          {"role": "assistant", "content": toy.caption(objs, grid)}])
            continue
        n_turns = int(rng.integers(1, 4))
        qas = []
        for i in rng.permutation(len(toy.QUESTION_TYPES)):
            qa = toy.ask(toy.QUESTION_TYPES[i], objs, grid, rng)
            if qa is not None:
                qas.append((toy.QUESTION_TYPES[i], *qa))
            if len(qas) == n_turns:
                break
        convs.append(_scene_messages(objs, grid, qas))
    return convs


def _lm_batches(tok, convs: list[list[dict]], batch: int, rng: np.random.Generator) -> list[dict]:
    """Batches of similar length (little padding), in random order; loss on every non-pad token."""
    import torch

    ids = tok(tok.apply_chat_template(convs, tokenize=False))["input_ids"]
    window = batch * 16
    batches = []
    for k in range(0, len(ids), window):
        chunk = sorted(ids[k:k + window], key=len)
        batches += [chunk[j:j + batch] for j in range(0, len(chunk), batch)]
    out = []
    for i in rng.permutation(len(batches)):
        rows = batches[i]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)})
    return out


def train_lm(tok, out_dir: Path, cfg: dict[str, Any], update: Callable[..., None]) -> dict:
    """Next-token pretraining of a tiny Qwen2 on toy chat text (no images); saves model + tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    seed = cfg["seed"]
    torch.manual_seed(seed)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(vocab_size=len(tok), bos_token_id=None, eos_token_id=im_end,
                         pad_token_id=tok.pad_token_id, **LM_ARCH)
    model = Qwen2ForCausalLM(config)
    steps, batch = cfg["lm_steps"], cfg["lm_batch"]
    batches = _lm_batches(tok, lm_texts(steps * batch, seed), batch, np.random.default_rng([seed, 203]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lm_lr"], weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    losses = []
    for step in range(steps):
        b = batches[step]
        lr = _cosine_lr(step, steps, cfg["lm_lr"], max(1, steps // 10))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        update(step + 1, f"loss {np.mean(losses[-10:]):.3f}")
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=im_end, pad_token_id=tok.pad_token_id,
                                               do_sample=False, max_new_tokens=64)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return {"params": sum(p.numel() for p in model.parameters()),
            "train_loss_first": round(float(np.mean(losses[:10])), 4),
            "train_loss_last": round(float(np.mean(losses[-10:])), 4)}


# ---- quality probes -------------------------------------------------------------------------------------------
def _val_lm_convs(data_dir: Path) -> tuple[list[list[dict]], list[str]]:
    scenes = {s["id"]: s for s in toy.load_scenes(data_dir, "val")}
    convs, types = [], []
    for rec in json.loads((data_dir / "instruct_val.json").read_text()):
        q = rec["conversations"][0]["value"].replace("<image>\n", "")
        convs.append([{"role": "user", "content": f"Scene: {scenes[rec['id']]['caption']}. {q}"},
                      {"role": "assistant", "content": rec["answer"]}])
        types.append(rec["question_type"])
    return convs, types


def probe_lm(lm_dir: Path, data_dir: Path, batch: int = 50) -> dict[str, Any]:
    """Held-out perplexity (all tokens of val chat text), answer perplexity, and teacher-forced answer accuracy
    (every answer token is the argmax) by question type, given the scene as text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    convs, types = _val_lm_convs(data_dir)
    nll_all = n_all = nll_ans = n_ans = 0.0
    correct: dict[str, list[bool]] = {}
    with torch.no_grad():
        for k in range(0, len(convs), batch):
            enc = tok.apply_chat_template(convs[k:k + batch], tokenize=True, return_dict=True, padding=True,
                                          return_tensors="pt", return_assistant_tokens_mask=True)
            ids, att = enc["input_ids"], enc["attention_mask"]
            ans = torch.as_tensor(enc["assistant_masks"]).bool()
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
            target, valid, ans_t = ids[:, 1:], att[:, 1:].bool(), ans[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            nll_all += nll[valid].sum().item()
            n_all += valid.sum().item()
            nll_ans += nll[ans_t].sum().item()
            n_ans += ans_t.sum().item()
            hit = (logits.argmax(-1) == target) | ~ans_t
            for j, t in enumerate(types[k:k + batch]):
                correct.setdefault(t, []).append(bool(hit[j].all()))
    acc = {t: round(float(np.mean(v)), 3) for t, v in sorted(correct.items())}
    return {"val_perplexity": round(math.exp(nll_all / n_all), 3),
            "val_answer_perplexity": round(math.exp(nll_ans / n_ans), 3),
            "val_answer_accuracy_from_text": round(float(np.mean([x for v in correct.values() for x in v])), 3),
            "val_answer_accuracy_by_type": acc}


def probe_retrieval(clip_dir: Path, data_dir: Path, tok, batch: int = 100) -> float:
    """Image->caption top-1 among the captions of its batch of ``batch`` val images (a caption identical to the
    right one counts as right)."""
    import torch
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    scenes = toy.load_scenes(data_dir, "val")
    images = _load_images(data_dir, scenes)
    caps = [toy.clip_caption([toy.Obj(o["shape"], o["colour"], 0, 0, 0, 0, 0) for o in s["objects"]])
            for s in scenes]
    hits = []
    with torch.no_grad():
        for k in range(0, len(scenes) - batch + 1, batch):
            img = model.get_image_features(pixel_values=_normalize(images[k:k + batch]))
            txt = model.get_text_features(**_clip_text(tok, caps[k:k + batch]))
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            pred = (img @ txt.T).argmax(-1).tolist()
            hits += [caps[k + p] == caps[k + i] for i, p in enumerate(pred)]
    return round(float(np.mean(hits)), 3) if hits else float("nan")


def clip_features(clip_dir: Path, images_u8, grid: int = 3, batch: int = 250) -> dict[str, "torch.Tensor"]:
    """Frozen toy-clip features: pooled CLS, patch tokens averaged per grid cell (concatenated), all patches
    averaged. Patches are assigned to the cell that holds their centre."""
    import torch
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(clip_dir).eval()
    vc = model.config
    side = vc.image_size // vc.patch_size
    centres = (torch.arange(side) * vc.patch_size + vc.patch_size / 2) * grid / vc.image_size
    cell_of = centres.floor().long()  # [side] patch row/col -> cell row/col
    assign = torch.zeros(grid * grid, side * side)
    for r in range(side):
        for c in range(side):
            assign[cell_of[r] * grid + cell_of[c], r * side + c] = 1.0
    assign = assign / assign.sum(1, keepdim=True)
    feats: dict[str, list] = {"cls": [], "patch_cells": [], "patch_mean": [], "patch_grid": []}
    with torch.no_grad():
        for k in range(0, len(images_u8), batch):
            out = model(pixel_values=_normalize(images_u8[k:k + batch]))
            patches = out.last_hidden_state[:, 1:]  # [B, side*side, D]
            feats["cls"].append(out.pooler_output)  # [B, D]
            feats["patch_cells"].append(torch.einsum("cp,bpd->bcd", assign, patches).flatten(1))  # [B, cells*D]
            feats["patch_mean"].append(patches.mean(1))  # [B, D]
            feats["patch_grid"].append(patches.reshape(len(patches), side, side, -1))  # [B, side, side, D]
    return {k: torch.cat(v) for k, v in feats.items()}


def _fit_linear(x_train, y_train, x_test, out_dim: int, loss_fn, epochs: int, lr: float, weight_decay: float,
                seed: int):
    """A linear map fitted full-batch with Adam on standardised features; returns its logits on ``x_test``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xtr, xte = (x_train - mu) / sd, (x_test - mu) / sd
    lin = torch.nn.Linear(xtr.shape[1], out_dim)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.01)
        lin.bias.zero_()
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        loss_fn(lin(xtr), y_train).backward()
        opt.step()
    with torch.no_grad():
        return lin(xte)


def softmax_probe(x_train, y_train, x_test, y_test, n_classes: int, epochs: int = 300, lr: float = 0.01,
                  weight_decay: float = 1e-3, seed: int = 0) -> float:
    """Multi-class linear probe (softmax regression, full batch Adam) on standardised features: test accuracy."""
    import torch

    logits = _fit_linear(x_train, y_train, x_test, n_classes, torch.nn.functional.cross_entropy, epochs, lr,
                         weight_decay, seed)
    return round((logits.argmax(-1) == y_test).float().mean().item(), 3)


def _object_features(scenes: list[dict], feats: dict, grid: int, image_size: int, patch: int):
    """Per object: its cell's mean patch feature and the 3x3 patch window around its cell centre; labels."""
    import torch

    side = image_size // patch
    cells, windows, shapes, colours = [], [], [], []
    for i, s in enumerate(scenes):
        for o in s["objects"]:
            cells.append(feats["patch_cells"][i].view(grid * grid, -1)[o["row"] * grid + o["col"]])
            r, c = (min(max(int((v + 0.5) * image_size / grid / patch), 1), side - 2) for v in (o["row"], o["col"]))
            windows.append(feats["patch_grid"][i, r - 1:r + 2, c - 1:c + 2].flatten())
            shapes.append(toy.SHAPES.index(o["shape"]))
            colours.append(toy.COLOURS_LIST.index(o["colour"]))
    return ({"cell_mean": torch.stack(cells), "patch_window_3x3": torch.stack(windows)},
            {"shape": torch.tensor(shapes), "colour": torch.tensor(colours)})


def logistic_probe(x_train, y_train, x_test, y_test, epochs: int = 300, lr: float = 0.01,
                   weight_decay: float = 1e-4, seed: int = 0) -> dict[str, float]:
    """Multi-label linear probe (one logistic regression per label, full batch Adam) on standardised features:
    exact-set accuracy and per-label accuracy on the test set."""
    import torch

    pred = _fit_linear(x_train, y_train, x_test, y_train.shape[1],
                       torch.nn.functional.binary_cross_entropy_with_logits, epochs, lr, weight_decay, seed) > 0
    truth = y_test > 0.5
    return {"exact": round((pred == truth).all(1).float().mean().item(), 3),
            "per_label": round((pred == truth).float().mean().item(), 3)}


def _majority(y_train, y_test) -> dict[str, float]:
    """Baselines: the most common label set of the train set, and each label's majority value."""
    import torch

    sets, counts = torch.unique(y_train, dim=0, return_counts=True)
    top = sets[counts.argmax()]
    per = (y_train.mean(0) > 0.5).float()
    return {"exact": round((y_test == top).all(1).float().mean().item(), 3),
            "per_label": round((y_test == per).float().mean().item(), 3)}


def _labels(scenes: list[dict], grid: int) -> dict[str, "torch.Tensor"]:
    import torch

    pos = torch.zeros(len(scenes), grid * grid)
    col = torch.zeros(len(scenes), len(toy.COLOURS_LIST))
    shp = torch.zeros(len(scenes), len(toy.SHAPES))
    for i, s in enumerate(scenes):
        for o in s["objects"]:
            pos[i, o["row"] * grid + o["col"]] = 1
            col[i, toy.COLOURS_LIST.index(o["colour"])] = 1
            shp[i, toy.SHAPES.index(o["shape"])] = 1
    return {"position": pos, "colour": col, "shape": shp}


def probe_features(clip_dir: Path, data_dir: Path, cfg: dict[str, Any],
                   update: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Linear probes on frozen toy-clip features (last layer; fit on train images, scored on val).

    Per image (multi-label): which cells are occupied, which colours and which shapes are present, from the pooled
    CLS, from patch tokens averaged per grid cell (concatenated), and from all patches averaged. Per object
    (multi-class): its shape and colour from its cell's mean patch token and from the 3x3 patch window around it.
    """
    meta = json.loads((data_dir / "meta.json").read_text())
    grid = meta["grid"]
    train = toy.load_scenes(data_dir, "train")[: cfg["probe_train"]]
    val = toy.load_scenes(data_dir, "val")
    f_tr = clip_features(clip_dir, _load_images(data_dir, train), grid)
    f_te = clip_features(clip_dir, _load_images(data_dir, val), grid)
    if update:
        update(1)
    y_tr, y_te = _labels(train, grid), _labels(val, grid)
    result: dict[str, Any] = {"n_train": len(train), "n_test": len(val), "metric": "exact-set accuracy (per-label)"}
    for target in y_tr:
        row = {"majority": _majority(y_tr[target], y_te[target])}
        for inp in ("cls", "patch_cells", "patch_mean"):
            row[inp] = logistic_probe(f_tr[inp], y_tr[target], f_te[inp], y_te[target], epochs=cfg["probe_epochs"],
                                      seed=cfg["seed"])
        result[target] = row
    patch = CLIP_ARCH["vision"]["patch_size"]
    x_tr, o_tr = _object_features(train, f_tr, grid, meta["image_size"], patch)
    x_te, o_te = _object_features(val, f_te, grid, meta["image_size"], patch)
    per_object: dict[str, Any] = {"metric": "accuracy", "n_train": len(o_tr["shape"]), "n_test": len(o_te["shape"])}
    for target, n_classes in (("shape", len(toy.SHAPES)), ("colour", len(toy.COLOURS_LIST))):
        majority = int(o_tr[target].bincount(minlength=n_classes).argmax())
        row = {"majority": round((o_te[target] == majority).float().mean().item(), 3)}
        for inp in x_tr:
            row[inp] = softmax_probe(x_tr[inp], o_tr[target], x_te[inp], o_te[target], n_classes,
                                     epochs=cfg["probe_epochs"], seed=cfg["seed"])
        per_object[target] = row
    result["per_object"] = per_object
    if update:
        update(2)
    return result
