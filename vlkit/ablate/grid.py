"""Expand a declared grid into runs, each an ordinary ``vlkit train`` run with overrides and a derived id.

Axes are key paths (``stages.align.lr``) or the study shortcuts ``projector``, ``tokens``, ``num_image_tokens``,
``fusion``, ``stages``. Token strategy x projector x N combinations map onto a defined model, or are skipped with
the reason recorded (never silently):

- ``cls`` with N > 1 and a per-token projector (linear/mlp) means ``cls_reshape`` to N tokens;
- ``patch`` with N below the encoder's patch count means ``pooled`` to N (linear/mlp), or N learned queries
  (cross_attention); without N, ``pooled`` means the base recipe's pooling when it has one (the default's 16) and
  cross_attention learns as many queries as that pooling gives;
- combinations that no model expresses (``cls_reshape`` on many tokens, N above the patch count, N not a square
  for pooling) are skipped.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

SHORTCUTS = {"projector": "projector.name", "tokens": "tokens.name", "fusion": "fusion.name", "stages": "train.stages"}
STUDY_AXES = ("tokens", "projector", "num_image_tokens")
PER_TOKEN = {"linear", "mlp"}


class Skip(Exception):
    """This combination defines no model; the message says why."""


@dataclass
class RunSpec:
    id: str
    seed: int
    axes: dict[str, Any]  # declared axis -> value (what the report groups by)
    overrides: list[str] = field(default_factory=list)
    mapping: str | None = None  # how a study combination was mapped to components
    skipped: str | None = None  # reason, when no model expresses the combination
    identity: str | None = None  # the point's Recipe.identity(), set by the plan
    work_identity: str | None = None  # ... and what it computes whatever it is called (vlkit/ablate/reuse.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_values(text: str) -> list[Any]:
    """``a,b,c`` -> typed values (YAML scalars: ``1e-3`` -> float, ``null`` -> None)."""
    import yaml

    out = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            out.append(yaml.safe_load(part))
    return out


def combo_overrides(tokens: str | None, projector: str | None, n: int | None, num_patches: int,
                    projector_tokens: int | None = None, base_pooled: int | None = None) -> tuple[list[str], str | None]:
    """Overrides that realise (token strategy, projector, N image tokens); raises :class:`Skip`.

    ``base_pooled``: the base recipe's count when its tokens are ``pooled`` (the default: 16); ``pooled`` or
    ``merged`` without an N then means the base's count (``tokens: [cls, pooled]`` compares CLS with the default's
    tokens, ``tokens: [pooled, merged]`` averaging with concatenating at the default's count)."""
    ov: list[str] = []
    note = None
    proj = projector
    if tokens in ("pooled", "merged") and n is None and base_pooled is not None:
        n = base_pooled
    if tokens is None and projector is None and n is None:
        return ov, None
    if tokens == "cls":
        ov.append("tokens.name=cls")
        k = n or 1
        if k > 1 and (proj in PER_TOKEN or proj is None):
            note = f"cls with {k} tokens -> cls_reshape (one CLS vector expanded to {k} tokens)"
            proj = "cls_reshape"
        if proj is not None and proj not in PER_TOKEN:
            ov.append(f"projector.num_tokens={k}")
    elif tokens is None and proj == "cls_reshape":  # a projector axis without a tokens axis: it reads the CLS vector
        ov, _ = combo_overrides("cls", proj, n, num_patches, projector_tokens)
        return ov, f"cls_reshape reads the CLS vector: tokens=cls, expanded to {n or 1} tokens"
    elif tokens in ("patch", "pooled", None):
        if n is not None and n > num_patches:
            raise Skip(f"{n} image tokens is more than the encoder's {num_patches} patches")
        if proj == "cls_reshape":
            raise Skip("cls_reshape expands one vector; it does not take patch tokens (use tokens=cls)")
        if n is None or n == num_patches:
            if tokens == "pooled" and n is None:
                raise Skip("pooled needs num_image_tokens")
            ov.append("tokens.name=patch" if tokens or n else "")
            if proj == "cross_attention":
                ov.append(f"projector.num_tokens={n or projector_tokens or base_pooled or num_patches}")
        elif proj == "cross_attention":
            ov += ["tokens.name=patch", f"projector.num_tokens={n}"]
            note = f"{num_patches} patches -> {n} learned queries (cross_attention)"
        else:
            if math.isqrt(n) ** 2 != n:
                raise Skip(f"pooling the patch grid needs a square token count, got {n}")
            ov += ["tokens.name=pooled", f"tokens.num_tokens={n}"]
            if tokens == "patch":
                note = f"patch with {n} < {num_patches} tokens -> pooled to {n}"
    elif tokens == "merged":
        if n is None:
            raise Skip("merged needs num_image_tokens")
        if n > num_patches or math.isqrt(n) ** 2 != n:
            raise Skip(f"merging the patch grid needs a square token count up to the encoder's {num_patches} "
                       f"patches, got {n}")
        if proj == "cls_reshape":
            raise Skip("cls_reshape expands one vector; it does not take patch tokens (use tokens=cls)")
        ov += ["tokens.name=merged", f"tokens.num_tokens={n}"]
        if proj == "cross_attention":
            ov.append(f"projector.num_tokens={projector_tokens or n}")
    elif tokens == "cls_patch":
        if n is not None and n != num_patches + 1:
            raise Skip(f"cls_patch always gives 1 + {num_patches} tokens, not {n}")
        ov.append("tokens.name=cls_patch")
        if proj == "cls_reshape":
            raise Skip("cls_reshape expands one vector; it does not take patch tokens")
        if proj == "cross_attention":
            ov.append(f"projector.num_tokens={n or num_patches + 1}")
    else:  # a plugin strategy: pass N through
        ov.append(f"tokens.name={tokens}")
        if n is not None:
            ov.append(f"tokens.num_tokens={n}")
    if proj is not None:
        ov.insert(0, f"projector.name={proj}")
    return [o for o in ov if o], note


def show_value(value: Any) -> str:
    """An axis value as results.csv writes it (lists joined with '+')."""
    return "+".join(map(str, value)) if isinstance(value, list) else str(value)


def _slug(value: Any) -> str:
    if isinstance(value, list):
        value = "+".join(map(str, value))
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-") or "none"


def run_id(axes: dict[str, Any], seed: int) -> str:
    parts = []
    for key, value in axes.items():
        short = {"num_image_tokens": "n"}.get(key, key.split(".")[-1])
        parts.append(f"{short}-{_slug(value)}")
    return "_".join(parts + [f"seed-{seed}"])


def expand(axes: dict[str, list[Any]], seeds: list[int], num_patches: int, base_seed_key: str = "train.seed",
           base_pooled: int | None = None) -> list[RunSpec]:
    """The cartesian product of the axes x seeds, each mapped to overrides (or marked skipped)."""
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid axis '{key}' needs a non-empty list of values, got {values!r}")
    names = list(axes)
    specs: list[RunSpec] = []
    seen: set[str] = set()
    for combo in itertools.product(*(axes[k] for k in names)):
        chosen = dict(zip(names, combo))
        for seed in seeds:
            ov: list[str] = []
            note = skipped = None
            try:
                study = {k: chosen.get(k) for k in STUDY_AXES}
                if any(v is not None for v in study.values()):
                    extra, note = combo_overrides(study["tokens"], study["projector"], study["num_image_tokens"],
                                                  num_patches, base_pooled=base_pooled)
                    ov += extra
            except Skip as exc:
                skipped = str(exc)
            for key, value in chosen.items():
                if key in STUDY_AXES:
                    continue
                path = SHORTCUTS.get(key, key)
                ov.append(f"{path}={_yaml_inline(value)}")
            ov.append(f"{base_seed_key}={seed}")
            rid = run_id(chosen, seed)
            if rid in seen:
                raise ValueError(f"two grid points share the run id '{rid}'; give the axes distinct values")
            seen.add(rid)
            specs.append(RunSpec(rid, seed, chosen, ov, note, skipped))
    return specs


def _yaml_inline(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
