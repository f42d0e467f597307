"""Pretraining the toy world's models once: tokenizer, then toy-clip and toy-lm side by side, then the probes, then
the manifest. ``vlkit toy pretrain`` runs it for the shipped preset (``default`` = ``v8``: about 6 CPU-hours,
toy-lm's 12 000 + 1 000 + 3 000 steps on one thread beside toy-clip's 2 500 on the other); the ``tiny`` preset is pretrained on first use in seconds (tests).

Everything is a function of ``pretrain_config(preset, seed)``: fixed step counts (never time budgets), fixed
seeds and one torch thread per job (float reduction order depends on the thread count).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from vlkit._locks import locked
from vlkit._proc import fp32_matmul_gflops, peak_rss_mb
from vlkit.data import toy
from vlkit.toyworld import _runtime, models, probes, shipped
from vlkit.toyworld.tokenizer import build_tokenizer

CONFIG_FORMAT = 3  # the layout of the config below (not a world version: the world is named by the config's hash)
THREADS = 1  # torch threads per job: part of what fixes the weights

CLIP_ARCH = dict(
    vision=dict(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4),
    text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=48),
    projection_dim=128,
)
# Untied embeddings: tied ones collapse the exchangeable colour/shape words of this tiny vocabulary into one
# direction, and the LM then cannot tell which word to copy out of its context.
LM_ARCH = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
               intermediate_size=352, max_position_embeddings=2048, tie_word_embeddings=False, rope_theta=10000.0)
DATA = dict(n_train=20000, n_val=1000, n_test=1000, image_size=64, grid=3, max_objects=4, multi_turn_share=0.5)
# The world where position matters (issue 26): 6-8 objects of 9 cells, no colour or shape more than twice, cell
# questions about any cell ("nothing" when empty), relations asked independently of the answer. A
# position-blind reader scores 0.28 / 0.28 / 0.11 / 0.22 on the four spatial types of its 1 000 val questions.
DATA_V4 = dict(DATA, min_objects=6, max_objects=8, max_repeat=2, cell_questions="any", relations="uniform")

PRESETS: dict[str, dict[str, Any]] = {
    # The previous world (shipped as "default" until issue 26, config hash 13607937d3f65cbe under that name): 1-4
    # objects, where a position-blind reader answers most spatial questions.
    "v3": dict(
        data=DATA,
        clip=dict(steps=2500, batch=128, lr=2e-3, arch=CLIP_ARCH),
        lm=dict(steps=5000, batch=32, lr=3e-3, turns=(6, 10), caption_share=0.15, other_token_weight=0.3,
                arch=LM_ARCH),
        probes=dict(n_train=3000, epochs=300),
    ),
    "tiny": dict(
        data=dict(DATA, n_train=400, n_val=160, n_test=40),
        clip=dict(steps=12, batch=32, lr=2e-3, arch=CLIP_ARCH),
        lm=dict(steps=12, batch=16, lr=3e-3, turns=(6, 10), caption_share=0.15, other_token_weight=0.3,
                arch=LM_ARCH),
        probes=dict(n_train=300, epochs=100),
    ),
}
PRESETS["tiny"]["lm"]["objects"] = dict(steps=4, batch=8, lr=1e-3, object_tokens=0.5, turns=[4, 6],
                                        caption_share=0.1, other_token_weight=0.3)
# The next world: v4 scenes and questions with one-token cell names, and a toy-lm recipe that reads cells. Chosen by
# pilots scored per type (benchmarks/toy_lm_curves.py; issue 26): the shipped recipe (lr 3e-3, cosine, all types
# from step 0) sits on the position-blind plateau for 1 500+ steps; a first phase of single look-ups only (10-14
# per chat), 4 heads of 32 dims and lr 1e-3 read colour_at_position at 1.00 after 750 steps. The second phase
# asks every type.
LOOKUP_TYPES = ["colour_at_position", "shape_at_position", "shape_of_colour"]
LM_V4 = dict(steps=12000, batch=32, lr=1e-3, schedule="held", turns=(8, 12), caption_share=0.1,
             other_token_weight=0.3, arch=dict(LM_ARCH, num_attention_heads=4, num_key_value_heads=4),
             phases=[{"steps": 1000, "types": LOOKUP_TYPES, "turns": [10, 14], "caption_share": 0.0},
                     {"steps": 11000}])
# toy-clip of v4 trains with one hard negative per image (a caption with a shape changed or two shapes swapped):
# v3's recipe on v4 scenes left shape unlearnt (per-object linear probe 0.53 from a cell's mean patch, chance 0.20)
# and a VLM on top answered shape questions at chance while it read colours per cell at 0.99 (issue 26).
PRESETS["v4"] = dict(PRESETS["v3"], data=dict(DATA_V4, cell_names="compass"), lm=LM_V4,
                     clip=dict(PRESETS["v3"]["clip"], hard_negatives=True))
# v5 (not shipped): v4's world and models, and a second toy-lm stage that teaches it to read a cell written as one
# token (models.train_lm_objects): an image token is one vector per cell, and the default VLM on v4's toy-lm
# answered shape per cell at 0.26-0.33 (3 seeds), on a pilot of this stage at 0.38-0.46. Made as this preset, the
# stage did not repeat that gain (0.30-0.34, the CLS-vs-patch study on v5; docs/toyworld.md).
LM_V5 = dict(LM_V4, objects=dict(steps=1000, batch=32, lr=1e-3, object_tokens=0.5, turns=[8, 12],
                                 caption_share=0.1, other_token_weight=0.3))
PRESETS["v5"] = dict(PRESETS["v4"], lm=LM_V5)
# v6 (shipped before v7): v5 with every caption chat of the second stage given its scene. Its toy-lm is the pilot's, bit for
# bit (sha256 854e30a9...), from the same random draws as v5's: the default VLM on it answers shape per cell above
# v5's and v4's in each of 3 seeds (docs/examples/cls_vs_patch, docs/toyworld.md).
PRESETS["v6"] = dict(PRESETS["v5"], lm=dict(LM_V5, objects=dict(LM_V5["objects"], caption_scene=1.0)))
# v7 (shipped before v8): v6 with toy-clip taught what each cell holds. A linear head on every patch token of the layer the
# VLM reads (hidden_states[-2]) names its cell's colour and shape (or "empty"), weight 1 beside the contrastive loss;
# the head is dropped after training and the CLS still learns from position-free captions only. v6's toy-clip
# held shape weakly at that layer (linear probe 0.55 from a cell's mean patch, 0.47 from the default's pooled token;
# chance 0.20) and the default VLM answered shape per cell at 0.46-0.55. toy-lm is v6's.
PRESETS["v7"] = dict(PRESETS["v6"], clip=dict(PRESETS["v6"]["clip"], cells=dict(weight=1.0, layer=-2)))
PRESETS["tiny"]["clip"]["cells"] = dict(weight=1.0, layer=-2)  # the tests' stand-in trains as the shipped one
# v8 (shipped): v7 with a third toy-lm stage that asks relation questions four times as often as any other type, loss on
# answers only (models.train_lm_focus). A relation chains two look-ups, and v7's toy-lm answered it from text at
# 0.70 (every single look-up at 1.00); the default VLM on v7 at 0.55-0.63. In a pilot of this stage (600 fresh
# val-split relation questions, greedy, scene as object tokens) v7's toy-lm rose 0.59 -> 0.63 -> 0.66 after 500 and
# 1 000 steps, other types kept at >= 0.94 (docs/toyworld.md).
LM_V8 = dict(PRESETS["v7"]["lm"], focus=dict(steps=3000, batch=32, lr=1e-3, type_weights={"relation": 4},
                                             object_tokens=0.5, turns=[8, 12], caption_share=0.05,
                                             caption_scene=1.0, other_token_weight=0.0))
PRESETS["v8"] = dict(PRESETS["v7"], lm=LM_V8)
SHIPPED_PRESET, SHIPPED_SEED = "v8", 0
DEFAULT_ALIAS = "default"  # names the shipped preset wherever a preset is asked for


def canonical_preset(preset: str | None) -> str:
    """``preset`` with the alias ``default`` (or nothing) read as the shipped preset; an unknown name is an error
    that lists the valid ones."""
    if preset in (None, "", DEFAULT_ALIAS):
        return SHIPPED_PRESET
    if preset not in PRESETS:
        raise ValueError(f"unknown toy world preset '{preset}'; valid: {DEFAULT_ALIAS} (= {SHIPPED_PRESET}, the "
                         f"shipped one), {', '.join(PRESETS)}")
    return preset


def pretrain_config(preset: str = DEFAULT_ALIAS, seed: int = 0) -> dict[str, Any]:
    """Everything that determines the pretrained files (its hash names them)."""
    preset = canonical_preset(preset)
    cfg = copy.deepcopy(PRESETS[preset])
    cfg["lm"]["turns"] = list(cfg["lm"]["turns"])
    return {"format": CONFIG_FORMAT, "preset": preset, "seed": seed, "threads": THREADS,
            "data_format": toy.FORMAT_VERSION, **cfg}


def shipped_config_hash() -> str:
    """The config hash the package's shipped weights must carry for this version of vlkit."""
    return shipped.config_hash(pretrain_config(SHIPPED_PRESET, SHIPPED_SEED))


def generate_data(data_dir: Path, config: dict[str, Any], progress: Callable[[int, int], None] | None = None):
    """The shapes world of a pretraining config (the same images and JSON at pretraining and at first use)."""
    return toy.generate_toy_data(data_dir, seed=config["seed"], progress=progress, **config["data"])


# ---- the two jobs ---------------------------------------------------------------------------------------------
def job_config(config: dict[str, Any], job: str) -> dict[str, Any]:
    """What one job's outputs are a function of: the config's format, seed and threads, the data (scenes and the
    tokenizer made from them) and the job's own section (toy-clip's probes too). toy-clip and toy-lm share no
    weights, so a change to one job's section leaves the other's checkpoints and finished outputs valid."""
    own = {"toy-clip": ("clip", "probes"), "toy-lm": ("lm",)}[job]
    return {k: config[k] for k in ("format", "seed", "threads", "data", *own)}


def job_key(config: dict[str, Any], job: str) -> str:
    """Names what a job's checkpoint or finished outputs belong to: the hash of ``job_config`` and the code that
    trains (vlkit, torch and transformers versions). Nothing with another key is resumed from or reused."""
    return f"job {job} {shipped.config_hash(job_config(config, job))} " + " ".join(
        f"{name} {version}" for name, version in _versions().items())


def _checkpoint(ckpt_dir: Path | None, config: dict[str, Any], job: str) -> models.StepCheckpoint:
    """A job's checkpoints: every 5 % of its steps, keyed by ``job_key``."""
    return models.StepCheckpoint(ckpt_dir, config[_SECTION[job]]["steps"] // 20, job_key(config, job))


# toy-lm's stages after the first, in order: each, when the lm config has it, fine-tunes the one before
LATER_STAGES = ("objects", "focus")
STAGE_TRAIN = {"objects": "train_lm_objects", "focus": "train_lm_focus"}


def lm_config_upto(config: dict[str, Any], stage: str | None) -> dict[str, Any]:
    """``config`` with toy-lm's stages after ``stage`` left out (``None``: the first stage only): what that
    stage's weights are a function of. With ``stage`` the config's last stage it is ``config``."""
    keep = LATER_STAGES[:LATER_STAGES.index(stage) + 1] if stage else ()
    return {**config, "lm": {k: v for k, v in config["lm"].items() if k not in LATER_STAGES or k in keep}}


def lm_base_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with toy-lm's first stage only (its ``lm`` without ``objects`` or ``focus``): what the first
    stage's weights are a function of. For a config without later stages it is ``config``."""
    return lm_config_upto(config, None)


def lm_stages(config: dict[str, Any]) -> list[str]:
    """The later stages (``LATER_STAGES``) the config's toy-lm has, in order."""
    return [s for s in LATER_STAGES if s in config["lm"]]


def job_steps(config: dict[str, Any], job: str) -> int:
    """A job's optimiser steps, all stages (its progress bar's total)."""
    section = config[_SECTION[job]]
    return section["steps"] + sum(section[s]["steps"] for s in LATER_STAGES if s in section)


def _clip_job(weights: Path, data_dir: Path, config: dict[str, Any], update, ckpt_dir: Path | None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(weights / "tokenizer")
    out = weights / "toy-clip"
    t, c = time.perf_counter(), time.process_time()
    stats = models.train_clip(data_dir, tok, out, config["clip"], config["seed"], update,
                              _checkpoint(ckpt_dir, config, "toy-clip"))
    t_train, c_train = time.perf_counter() - t, time.process_time() - c
    update(config["clip"]["steps"], "probing")
    t, c = time.perf_counter(), time.process_time()
    stats["retrieval_top1_batch100"] = probes.probe_retrieval(out, data_dir, tok)
    linear = probes.probe_features(out, data_dir, config["probes"]["n_train"], config["probes"]["epochs"],
                                   config["seed"])
    return {"toy_clip": stats, "linear_probes": linear,
            "seconds": {"toy-clip": t_train, "toy-clip probes": time.perf_counter() - t},
            "cpu_seconds": {"toy-clip": c_train, "toy-clip probes": time.process_time() - c}}


def _kept_result(kept: Path, key: str, what: str) -> dict[str, Any] | None:
    """The result of a kept job or stage (``kept/result.json``), or None when there is none; one kept under
    another key than ``key`` (another config or version) is an error naming it and the way out."""
    if not (kept / "result.json").is_file():
        return None
    found = (kept / "key.txt").read_text().strip() if (kept / "key.txt").is_file() else "no key"
    if found != key:
        raise RuntimeError(f"toy world: the finished {what} in {kept} belongs to another config or version "
                           f"({found!r}, this one is {key!r}); delete it (or run with --restart) to train {what} "
                           f"again")
    return json.loads((kept / "result.json").read_text())


def _fresh_tmp(dest: Path) -> Path:
    """An empty temporary sibling of ``dest``, named by this process, for ``_write_kept``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _write_kept(tmp: Path, dest: Path, result: dict[str, Any], key: str) -> None:
    """Adds ``result.json`` and ``key.txt`` to ``tmp`` (which holds the outputs) and renames it to ``dest``: the
    kept job or stage is whole or absent (a kill mid-write leaves only the temporary directory)."""
    (tmp / "result.json").write_text(json.dumps(result))
    (tmp / "key.txt").write_text(key + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)


def _lm_job(weights: Path, data_dir: Path, config: dict[str, Any], update, ckpt_dir: Path) -> dict[str, Any]:
    """toy-lm: its first stage (kept in ``ckpt_dir``), then each later stage the config has (``lm_stages``; each
    but the last kept too), then the probes. Training starts after the latest kept stage (an interrupted run's,
    or one ``reuse_earlier`` put there). With later stages the report nests each stage's figures
    (``first_stage``, ``objects``, ``focus``) beside the final model's size and probes."""
    out = weights / "toy-lm"
    stages = lm_stages(config)
    kept_at = next((k for k in range(len(stages) - 2, -1, -1)
                    if (ckpt_dir / f"{stages[k]}.finished" / "result.json").is_file()), None)
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    stats: dict[str, Any] = {}
    if kept_at is None:
        base = _lm_first_stage(weights, config, update, ckpt_dir)
        seconds.update(base["seconds"])
        cpu.update(base["cpu_seconds"])
        stats = {"params": base["toy_lm"].get("params"), "first_stage": base["toy_lm"]}
        prev, todo = ckpt_dir / BASE_KEPT / "toy-lm", stages
    else:
        prev, todo = None, stages[kept_at:]
    if not stages:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(ckpt_dir / BASE_KEPT / "toy-lm", out)
        stats = base["toy_lm"]
    for stage in todo:
        done = config["lm"]["steps"] + sum(config["lm"][s]["steps"] for s in stages[:stages.index(stage)])
        result = _lm_later_stage(stage, prev, stage == stages[-1], out, config, data_dir, update, done, ckpt_dir,
                                 stats)
        stats.update(result["toy_lm"])
        seconds.update(result["seconds"])
        cpu.update(result["cpu_seconds"])
        prev = ckpt_dir / f"{stage}.finished" / "toy-lm"
    update(job_steps(config, "toy-lm"), "probing")
    t, c = time.perf_counter(), time.process_time()
    stats.update(probes.probe_lm(out, data_dir))
    seconds["toy-lm probes"], cpu["toy-lm probes"] = time.perf_counter() - t, time.process_time() - c
    return {"toy_lm": stats, "seconds": seconds, "cpu_seconds": cpu}


def _lm_later_stage(stage: str, prev: Path, last: bool, out: Path, config: dict[str, Any], data_dir: Path, update,
                    done: int, ckpt_dir: Path, before: dict[str, Any]) -> dict[str, Any]:
    """One later stage of toy-lm, fine-tuning the model in ``prev``, its checkpoints in ``ckpt_dir/<stage>`` under
    the key of ``lm_config_upto(config, stage)``. The last stage writes ``out``; an earlier one is kept in
    ``ckpt_dir/<stage>.finished`` (or taken from there, also when ``reuse_earlier`` put it there). Returns
    ``{"toy_lm": {"params", <stage>: its figures}, "seconds", "cpu_seconds"}``; a kept stage's ``toy_lm`` also
    holds the figures of the stages before it (``first_stage`` ..., from ``before``), so a run resumed after it
    reports them too."""
    mine = lm_config_upto(config, stage)
    key = job_key(mine, "toy-lm")
    kept = ckpt_dir / f"{stage}.finished"
    if not last:
        result = _kept_result(kept, key, f"toy-lm {stage} stage")
        if result is not None:
            update(done + config["lm"][stage]["steps"], f"{stage} stage kept")
            return result
    dest = out if last else _fresh_tmp(kept)
    t, c = time.perf_counter(), time.process_time()
    train = getattr(models, STAGE_TRAIN[stage])
    figures = train(prev, dest if last else dest / "toy-lm", config["lm"][stage], config["seed"], config["data"],
                    lambda n, text="": update(done + n, text),
                    models.StepCheckpoint(ckpt_dir / stage, config["lm"][stage]["steps"] // 20, key))
    name = f"toy-lm {stage}"
    earlier = {k: v for k, v in before.items() if k in ("first_stage", *LATER_STAGES)}
    result = {"toy_lm": {**earlier, "params": figures.pop("params"), stage: figures},
              "seconds": {name: time.perf_counter() - t}, "cpu_seconds": {name: time.process_time() - c}}
    if not last:
        _write_kept(dest, kept, result, key)
    return result


BASE_KEPT = "base.finished"  # toy-lm's first stage, finished, in the job's checkpoint directory


def _lm_first_stage(weights: Path, config: dict[str, Any], update, ckpt_dir: Path) -> dict[str, Any]:
    """toy-lm's first stage (``models.train_lm``), kept in ``ckpt_dir/base.finished`` under the key of
    ``lm_base_config`` (an interrupted second stage resumes after it, not from step 0), or taken from there when
    it is already kept (also by ``reuse_earlier``). Returns its result: stats and times."""
    from transformers import AutoTokenizer

    base_config = lm_base_config(config)
    key = job_key(base_config, "toy-lm")
    kept = ckpt_dir / BASE_KEPT
    result = _kept_result(kept, key, "toy-lm first stage")
    if result is not None:
        update(config["lm"]["steps"], "first stage kept")
        return result
    tok = AutoTokenizer.from_pretrained(weights / "tokenizer")
    tmp = _fresh_tmp(kept)
    t, c = time.perf_counter(), time.process_time()
    stats = models.train_lm(tok, tmp / "toy-lm", base_config["lm"], config["seed"], config["data"], update,
                            _checkpoint(ckpt_dir, base_config, "toy-lm"))
    result = {"toy_lm": stats, "seconds": {"toy-lm": time.perf_counter() - t},
              "cpu_seconds": {"toy-lm": time.process_time() - c}}
    _write_kept(tmp, kept, result, key)
    (ckpt_dir / models.StepCheckpoint.FILE).unlink(missing_ok=True)  # the first stage's last checkpoint
    return result


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys where two configs differ, one level into sections (``lm.objects``, ``data.n_train``)."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if x == y:
            continue
        if isinstance(x, dict) and isinstance(y, dict) and not prefix:
            out += _differences(x, y, f"{k}.")
        else:
            out.append(prefix + k)
    return out


def _versions() -> dict[str, str]:
    """The versions of the code that trains (``job_key`` names them; a manifest's ``written_by`` records them)."""
    import torch
    import transformers

    import vlkit

    return {"vlkit": vlkit.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _written_by(manifest: dict[str, Any]) -> dict[str, Any]:
    """The versions that wrote a manifest, in ``_versions``' form."""
    return {k: manifest.get("written_by", {}).get(k) for k in _versions()}


def _settings(config: dict[str, Any], job: str) -> dict[str, Any]:
    """What a reused job must share with this one: ``job_config`` and the data format."""
    return {**job_config(config, job), "data_format": config.get("data_format")}


def _matching(config: dict[str, Any], old: dict[str, Any]) -> tuple[list[tuple[str, dict, str]], list[str]]:
    """What of an earlier pretraining (config ``old``) this config can take: (job, the config it stands for, where
    it is kept) for toy-clip and for toy-lm whole or as its first stage; and what differs for the others."""
    candidates = [("toy-clip", config, "toy-clip.finished"), ("toy-lm", config, "toy-lm.finished")]
    candidates += [("toy-lm", lm_config_upto(config, stage), f"toy-lm/{stage}.finished")
                   for stage in lm_stages(config)[:-1][::-1]]  # an earlier world's toy-lm as a kept later stage
    candidates.append(("toy-lm", lm_base_config(config), f"toy-lm/{BASE_KEPT}"))
    found: list[tuple[str, dict, str]] = []
    differ: list[str] = []
    for job, mine, kept in candidates:
        if job == "toy-lm" and any(j == "toy-lm" for j, _, _ in found):
            continue
        if _settings(mine, job) != _settings(old, job):
            differ.append(f"{_kept_name(job, kept)} differs in "
                          f"{', '.join(_differences(_settings(mine, job), _settings(old, job)))}")
            continue
        found.append((job, mine, kept))
    return found, differ


def _kept_name(job: str, kept: str) -> str:
    """How a reused job or stage is named in messages: toy-clip, toy-lm, toy-lm first stage, toy-lm objects stage."""
    if kept.endswith(BASE_KEPT):
        return "toy-lm first stage"
    stage = kept.split("/")[-1].removesuffix(".finished")
    return f"toy-lm {stage} stage" if "/" in kept else job


def reusable_from(config: dict[str, Any], weights_dir: Path) -> bool:
    """Whether ``reuse_earlier`` would take anything from ``weights_dir`` for ``config`` (its manifest read, not
    verified; same versions)."""
    try:
        manifest = shipped.read_manifest(Path(weights_dir))
    except shipped.ToyWeightsError:
        return False
    return _written_by(manifest) == _versions() and bool(_matching(config, manifest["config"])[0])


def reuse_earlier(work: Path, config: dict[str, Any], weights_dir: Path) -> dict[str, Any]:
    """Takes what an earlier pretraining made with the same settings instead of training it again.

    ``weights_dir`` is that pretraining's weights directory: its manifest is verified, and it must have been
    written by the same vlkit, torch and transformers versions (the versions ``job_key`` names; other versions
    may compute other weights). toy-clip is taken when its settings (``job_config`` and the data format) equal
    this config's; toy-lm whole when its settings do, or else as this config's toy-lm *first stage* when they
    equal this config's ``lm_base_config`` (an earlier world without the second stage). Each becomes a kept job
    or stage in ``work/checkpoints`` (only the files its manifest lists), with its figures from that manifest's
    report and where it came from (config hash and versions). Returns that record; a directory with nothing
    reusable is an error naming what differs."""
    weights_dir = Path(weights_dir)
    fix = "pass the weights directory an earlier `vlkit toy pretrain` wrote, or drop --reuse"
    try:
        manifest = shipped.verify(weights_dir, fix=fix)
    except shipped.ToyWeightsError as e:
        raise ValueError(f"toy world: --reuse {weights_dir}: {e}") from None
    written = _written_by(manifest)
    if written != _versions():
        raise ValueError(f"toy world: --reuse {weights_dir}: it was written by {written}, this is {_versions()}; "
                         f"weights of other versions may differ from what these compute, so they are not taken "
                         f"(drop --reuse)")
    old, report = manifest["config"], manifest.get("report", {})
    source = {"config_hash": manifest["config_hash"], "written_by": manifest.get("written_by", {})}
    seconds, cpu = report.get("seconds", {}), report.get("job_cpu_seconds", {})

    def times(keys):
        return ({k: seconds[k] for k in keys if k in seconds}, {k: cpu[k] for k in keys if k in cpu})

    taken: list[str] = []
    found, differ = _matching(config, old)
    for job, mine, kept in found:
        if job == "toy-clip":
            sec, cs = times(("toy-clip", "toy-clip probes"))
            result = {"toy_clip": {**report.get("toy_clip", {}), "reused_from": source},
                      "linear_probes": report.get("linear_probes", {}), "seconds": sec, "cpu_seconds": cs}
        elif kept == "toy-lm.finished":
            sec, cs = times(("toy-lm", "toy-lm objects", "toy-lm probes"))
            result = {"toy_lm": {**report.get("toy_lm", {}), "reused_from": source}, "seconds": sec,
                      "cpu_seconds": cs}
        elif not kept.endswith(BASE_KEPT):  # a whole earlier toy-lm as this one's kept later stage
            stage = kept.split("/")[-1].removesuffix(".finished")
            sec, cs = times(("toy-lm", *(f"toy-lm {s}" for s in LATER_STAGES[:LATER_STAGES.index(stage) + 1])))
            earlier = report.get("toy_lm", {})
            figures = {k: earlier[k] for k in ("first_stage", *LATER_STAGES) if k in earlier}
            figures[stage] = {**figures.get(stage, {}), "reused_from": source}
            result = {"toy_lm": {"params": earlier.get("params"), **figures}, "seconds": sec, "cpu_seconds": cs}
        else:
            sec, cs = times(("toy-lm",))
            stats = {k: v for k, v in report.get("toy_lm", {}).items()
                     if k in ("params", "train_loss_first", "train_loss_last", "resumed_at_step")}
            result = {"toy_lm": {**stats, "reused_from": source}, "seconds": sec, "cpu_seconds": cs}
        _keep(work / "checkpoints" / kept, weights_dir, manifest, job, result, job_key(mine, job))
        taken.append(_kept_name(job, kept))
    if not taken:
        raise ValueError(f"toy world: --reuse {weights_dir}: nothing in it was made with this preset's settings "
                         f"({'; '.join(differ)}); drop --reuse, or pass weights pretrained with these settings")
    return {**source, "taken": taken}


def _keep(dest: Path, weights_dir: Path, manifest: dict[str, Any], component: str, result: dict[str, Any],
          key: str) -> None:
    """Writes a kept job or stage ``dest`` (``<component>/`` with the files the manifest lists, ``result.json``,
    ``key.txt``) through a temporary directory and a rename: whole or absent."""
    tmp = _fresh_tmp(dest)
    for rel in manifest["files"]:
        if rel.startswith(component + "/"):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(weights_dir / rel, tmp / rel)
    _write_kept(tmp, dest, result, key)


JOBS = {"toy-clip": _clip_job, "toy-lm": _lm_job}
_SECTION = {"toy-clip": "clip", "toy-lm": "lm"}


def job_threads(config: dict[str, Any], job: str) -> int:
    """A job's torch threads: its section's ``threads`` if set (toy-lm may use both cores), else the config's."""
    return int(config[_SECTION[job]].get("threads", config["threads"]))


def _run_job(name: str, weights: Path, data_dir: Path, config: dict[str, Any], update, ckpt_root: Path
             ) -> dict[str, Any]:
    """``JOBS[name]`` with its checkpoints in ``ckpt_root/<name>``. A job that finished keeps its outputs (the
    model directory ``weights/<name>`` and its result) in ``ckpt_root/<name>.finished``, so that resuming an
    interrupted pretraining does not run it again: hours of toy-lm need not wait for toy-clip twice, and the
    checkpoints carried across machines are the unfinished job's state plus the finished job's weights."""
    kept = ckpt_root / f"{name}.finished"
    result = _kept_result(kept, job_key(config, name), name)
    if result is not None:  # its times are those of the run that made it
        shutil.rmtree(weights / name, ignore_errors=True)
        shutil.copytree(kept / name, weights / name)
        update(job_steps(config, name), "kept from an interrupted run")
        return result
    result = JOBS[name](weights, data_dir, config, update, ckpt_root / name)
    tmp = _fresh_tmp(kept)
    shutil.copytree(weights / name, tmp / name)
    _write_kept(tmp, kept, result, job_key(config, name))
    return result


def _job_main(name: str, weights: str, data_dir: str, config: dict[str, Any], ckpt_dir: str, parent: int, step,
              info, queue) -> None:
    """Entry point of a job process: runs ``JOBS[name]`` and puts ("ok", result) or ("error", traceback)."""
    import traceback

    try:
        _runtime.tune_malloc()
        with _runtime.quiet_runtime(job_threads(config, name)):
            def update(done: int, text: str = "") -> None:
                if os.getppid() != parent:  # the parent was killed: stop, or a rerun would share our files
                    raise SystemExit(f"toy world: the {name} job stops, its parent process is gone")
                info.value = text.encode()[:63]
                step.value = done

            kept = (Path(ckpt_dir) / f"{name}.finished" / "result.json").is_file()
            result = _run_job(name, Path(weights), Path(data_dir), config, update, Path(ckpt_dir))
            if not kept:  # a kept job's process trained nothing: its memory says nothing of the job
                result["peak_rss_mb"] = {name: round(peak_rss_mb(), 1)}
            queue.put(("ok", result))
    except BaseException:  # noqa: BLE001 - sent to the parent, which raises it with the job's name
        queue.put(("error", traceback.format_exc()))


def _run_jobs(weights: Path, data_dir: Path, config: dict[str, Any], updates: dict[str, Callable[..., None]],
              ckpt_dir: Path):
    """toy-clip and toy-lm are independent: each trains in its own single-threaded process, side by side, with
    its checkpoints in ``ckpt_dir/<job>``."""
    if not _runtime.parallel_jobs():
        results = []
        for name in JOBS:
            with _runtime.quiet_runtime(job_threads(config, name)):
                results.append(_run_job(name, weights, data_dir, config, updates[name], ckpt_dir))
        return results
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    procs = {}
    for name in JOBS:
        step, info, q = ctx.Value("i", 0), ctx.Array("c", 64), ctx.Queue()
        p = ctx.Process(target=_job_main, args=(name, str(weights), str(data_dir), config, str(ckpt_dir),
                                                os.getpid(), step, info, q), daemon=True)
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
                        raise RuntimeError(f"toy world: the {name} process died (exit code {p.exitcode})") from None
                    continue
                if status == "error":
                    raise RuntimeError(f"toy world: pretraining {name} failed:\n{payload}")
                results[name] = payload
                updates[name](step.value, "done")
    finally:
        for p, *_ in procs.values():
            if p.is_alive():
                p.terminate()
            p.join()
    return [results[name] for name in JOBS]


# ---- the whole pretraining ------------------------------------------------------------------------------------
def pretrain(out_dir: str | os.PathLike, preset: str = DEFAULT_ALIAS, seed: int = 0, *,
             data_dir: str | os.PathLike | None = None, console: Any = None, restart: bool = False,
             reuse: str | os.PathLike | None = None) -> dict[str, Any]:
    """Pretrain tokenizer, toy-clip and toy-lm of ``preset`` into ``out_dir`` (replaced whole, only once
    everything succeeded) and write its manifest; returns the manifest. ``data_dir`` holds (or receives) the
    preset's shapes world; by default it is generated into the work directory. The caller's global RNG states are
    left as they were.

    The work happens in ``.<out_dir name>.building-<config hash>`` beside ``out_dir``; each job checkpoints there
    every 5 % of its steps. A pretraining that is interrupted (killed, out of memory, session over) leaves that
    directory, and the next call with the same config resumes from the checkpoints, to the same weights as a
    straight run; ``restart=True`` discards them. The work directory is removed once ``out_dir`` is in place.

    ``reuse``: an earlier pretraining's weights directory whose jobs (or toy-lm's first stage) made with the same
    settings are taken instead of trained again (``reuse_earlier``); the report says what came from where."""
    with _runtime.caller_rng_kept():
        return _pretrain(out_dir, preset, seed, data_dir=data_dir, console=console, restart=restart, reuse=reuse)


def _pretrain(out_dir: str | os.PathLike, preset: str, seed: int, *, data_dir: str | os.PathLike | None,
              console: Any, restart: bool, reuse: str | os.PathLike | None = None) -> dict[str, Any]:
    config = pretrain_config(preset, seed)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    console = console or _runtime.console()
    work = out.parent / f".{out.name}.building-{shipped.config_hash(config)}"
    with locked(out.parent / f".{out.name}.pretrain.lock"):  # one pretraining per work directory at a time
        if restart:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(exist_ok=True)
        found = _checkpointed_jobs(work)
        if reuse is not None:
            taken = reuse_earlier(work, config, Path(reuse))
            console.print(f"toy world: taking {' and '.join(taken['taken'])} from {reuse} (config "
                          f"{taken['config_hash']})")
        if found:
            console.print(f"toy world: resuming an interrupted pretraining ({', '.join(found)}) from its checkpoints "
                          f"in {work / 'checkpoints'} (--restart starts over)")
        shutil.rmtree(work / "weights", ignore_errors=True)  # a previous attempt's partial outputs
        if data_dir is None:
            shutil.rmtree(work / "data", ignore_errors=True)  # regenerated (seconds): it may be half-written
        try:
            manifest = _pretrain_in(work, out, config, data_dir, console)
        except BaseException:
            if _checkpointed_jobs(work):
                console.print(f"toy world: pretraining stopped; its checkpoints are kept in {work / 'checkpoints'}: "
                              f"the same command resumes from them")
            raise
        shutil.rmtree(work, ignore_errors=True)
        return manifest


def _checkpointed_jobs(work: Path) -> list[str]:
    """The jobs with a checkpoint in the work directory ``work``."""
    root = work / "checkpoints"
    return sorted({p.relative_to(root).parts[0] for p in root.glob(f"*/**/{models.StepCheckpoint.FILE}")}
                  | {p.parent.name for p in root.glob("*/*.finished")})


def _pretrain_in(work: Path, out: Path, config: dict[str, Any], data_dir: str | os.PathLike | None,
                 console: Any) -> dict[str, Any]:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    weights = work / "weights"
    data = Path(data_dir) if data_dir is not None else work / "data"
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console) as progress, _runtime.quiet_runtime(config["threads"]):
        def phase(name: str, total: int) -> Callable[..., None]:
            task = progress.add_task(name, total=total, info="")
            return lambda done, info="": progress.update(task, completed=done, info=info)

        if not (data / "meta.json").is_file():
            t = time.perf_counter()
            up = phase("data", sum(config["data"][k] for k in ("n_train", "n_val", "n_test")))
            generate_data(data, config, lambda done, total: up(done))
            times["data"] = time.perf_counter() - t
        t = time.perf_counter()
        up = phase("tokenizer", 1)
        tok = build_tokenizer(data, weights / "tokenizer")
        up(1, f"vocab {len(tok)}")
        times["tokenizer"] = time.perf_counter() - t
        t = time.perf_counter()
        updates = {"toy-clip": phase("toy-clip", config["clip"]["steps"]),
                   "toy-lm": phase("toy-lm", job_steps(config, "toy-lm"))}
        report: dict[str, Any] = {}
        cpu: dict[str, float] = {}
        rss: dict[str, float] = {}
        for result in _run_jobs(weights, data, config, updates, work / "checkpoints"):
            times.update(result.pop("seconds"))
            cpu.update(result.pop("cpu_seconds"))
            rss.update(result.pop("peak_rss_mb", {}))
            report.update(result)
        times["models + probes (wall)"] = time.perf_counter() - t
        times["total"] = time.perf_counter() - t_all
        report["seconds"] = {k: round(v, 1) for k, v in times.items()}
        report["job_cpu_seconds"] = {k: round(v, 1) for k, v in cpu.items()}
        if rss:
            report["job_peak_rss_mb"] = rss
        report["machine"] = {"cpu_count": os.cpu_count(), "parallel_jobs": _runtime.parallel_jobs(),
                             "fp32_matmul_gflops_1_thread": fp32_matmul_gflops(),
                             "load_avg_1min_at_end": _runtime.loadavg()}
    manifest = shipped.write_manifest(weights, config, report)
    _runtime.replace_dir(weights, out)
    return manifest
