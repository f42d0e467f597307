"""Typed recipes: YAML -> validated :class:`Recipe`.

One grammar everywhere: a recipe file, optionally extending another (``base: other.yaml``), then command-line
overrides ``key.path=value`` (the value is parsed as YAML: ``3``, ``1e-4``, ``[align, instruct]``, ``null``).
Every problem is reported at once, each naming the file, the key path and the nearest valid key.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlkit.registry import FAMILIES, RegistryError, suggest

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class ConfigError(ValueError):
    """One or more problems in a recipe; ``errors`` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source, self.errors = source, errors
        super().__init__(f"{len(errors)} problem(s) in recipe {source}:\n" + "\n".join(f"  - {e}" for e in errors))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Component(BaseModel):
    """``name:`` picks a registered component; every other key is a parameter of its factory."""

    model_config = ConfigDict(extra="allow")
    name: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(_Strict):
    image_root: str = "toy:data/images"
    max_length: int = Field(256, ge=8)
    # skip bad samples instead of stopping: records that fail the pre-flight checks (reported) and images that fail
    # to decode during training (counted in metrics.jsonl and summary.json as skipped_images); docs/runs.md
    skip_bad: bool = False
    group_by_length: bool = True  # LLaVA's group_by_modality_length
    num_workers: int = Field(0, ge=0)  # image-loading processes per training process (0: in the main process)


class LoraConfig(_Strict):
    r: int = Field(8, ge=1)
    alpha: float = 16
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class StageConfig(_Strict):
    data: str
    eval_data: str | None = None
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)  # projector (and everything without its own lr)
    lr_llm: float | None = Field(None, gt=0)
    lr_encoder: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    # the learning rate after warm-up. cosine: decays to 0 over the stage (LLaVA). wsd: held, then decays (cosine) over
    # the last decay_ratio of the steps (warmup-stable-decay, MiniCPM): a loss plateau that ends late in the stage
    # still ends at a useful rate. constant: held to the end.
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_ratio: float = Field(0.2, gt=0, le=1)  # wsd only; the other schedules ignore it
    max_grad_norm: float | None = 1.0
    llm: Literal["frozen", "lora", "full"] = "frozen"
    lora: LoraConfig = LoraConfig()
    train_projector: bool = True
    unfreeze_encoder_blocks: int = Field(0, ge=0)
    gradient_checkpointing: bool = False
    eval_every: int | None = Field(None, ge=1)
    eval_max_samples: int | None = Field(300, ge=1)
    eval_batch_size: int = Field(32, ge=1)
    save_every: int = Field(100, ge=1)
    max_new_tokens: int = Field(16, ge=1)


class TrainConfig(_Strict):
    stages: list[str] = ["align", "instruct"]
    seed: int = 0
    deterministic: bool = True
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    output_dir: str = "runs"
    run_name: str | None = None
    feature_cache: bool = False
    cache_dir: str | None = None
    # multi-process training (launch with torchrun / deepspeed / srun; see vlkit/distributed/). auto: DDP when
    # launched with more than one process. Launch settings are not part of a run's identity.
    distributed: Literal["auto", "none", "ddp", "fsdp", "deepspeed"] = "auto"
    deepspeed: dict[str, Any] | str | None = None  # DeepSpeed config, or a path to its JSON; {zero_stage: 2} shorthand

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_config(cls, value: Any) -> Any:
        if isinstance(value, dict):
            from vlkit.deepspeed_config import deepspeed_config_problems

            problems = deepspeed_config_problems(value)
            if problems:
                raise ValueError("; ".join(problems))
        return value


LAUNCH_KEYS = ("distributed", "deepspeed")  # train.* keys that say how to run, not what to compute
NAMING_KEYS = ("name", "description")  # what a recipe is called ...
NAMING_TRAIN_KEYS = ("output_dir", "run_name")  # ... and where its runs are written: not what a run computes


def work_identity(config: dict[str, Any]) -> str:
    """A short hash of what a run computes, from its resolved config (``Recipe.to_dict()`` or a run's
    ``config.yaml``): :meth:`Recipe.identity` less the names (recipe name, description, output directory, run name).
    One config run under two studies' recipes has one work identity, so a finished run of one study can stand in
    for the other's (``vlkit ablate --reuse``); the identity proper keeps the name, as every run directory has."""
    data = json.loads(json.dumps(config))  # a deep copy, tuples as lists: a config.yaml read back hashes the same
    for key in ("expect", *NAMING_KEYS):
        data.pop(key, None)
    for key in (*LAUNCH_KEYS, *NAMING_TRAIN_KEYS):
        data.get("train", {}).pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


class Recipe(_Strict):
    name: str
    description: str = ""
    encoder: Component
    tokens: Component = Component(name="patch")
    projector: Component = Component(name="mlp")
    llm: Component
    fusion: Component = Component(name="prefix")
    data: DataConfig = DataConfig()
    stages: dict[str, StageConfig]
    train: TrainConfig = TrainConfig()
    grid: dict[str, Any] | None = None  # ablation axes: key.path or shortcut -> values; "seeds": N or list
    # a study's declared expectations, grammar in vlkit/ablate/expect.py, judged by the report; not part of a run's identity
    expect: list[Any] | None = None

    @model_validator(mode="after")
    def _stages_exist(self) -> "Recipe":
        if not self.train.stages:
            raise ValueError("train.stages is empty: name at least one stage from the 'stages:' section")
        for s in self.train.stages:
            if s not in self.stages:
                raise ValueError(
                    f"train.stages names stage '{s}' that is not defined under 'stages:'.{suggest(s, self.stages)} "
                    f"Defined: {', '.join(self.stages)}"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if data.get("expect") is None:  # recipes without expectations dump (and hash) as they always did
            data.pop("expect", None)
        for stage in data.get("stages", {}).values():  # so do stages on the default schedule (schedule keys
            if stage.get("schedule") != "wsd":     # came later); decay_ratio shapes only wsd, so it is left out
                stage.pop("decay_ratio", None)   # of the others' identity too
            if stage.get("schedule") == StageConfig.model_fields["schedule"].default:
                stage.pop("schedule", None)
        return data

    def identity(self) -> str:
        """A short hash of the resolved config (what a run's results belong to).

        Launch settings (``train.distributed``, ``train.deepspeed``) are left out: a run started on 8 GPUs resumes
        on 4 or on one, and a distributed run computes the single-process result. So are a study's expectations
        (``expect:``): they say what the report checks, not what a run computes."""
        data = self.to_dict()
        data.pop("expect", None)
        for key in LAUNCH_KEYS:
            data["train"].pop(key, None)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def work_identity(self) -> str:
        """What a run of this recipe computes, whatever the recipe is called (see :func:`work_identity`)."""
        return work_identity(self.to_dict())


COMPONENT_SECTIONS = {"encoder": "encoders", "tokens": "token_strategies", "projector": "projectors", "llm": "llms",
                      "fusion": "fusions"}
# Parameters vlkit itself passes to a family's factory (a recipe may not set them, except num_tokens).
SUPPLIED = {"projector": {"in_dim", "out_dim", "text_norm"}, "fusion": {"llm"}, "tokens": {"grid"}}


# ---- loading --------------------------------------------------------------------------------------------------
def find_recipe(path: str | Path) -> Path:
    """A recipe path as given, or relative to the shipped ``recipes/`` dir."""
    p = Path(path)
    if p.exists():
        return p
    for cand in (RECIPES_DIR / p, RECIPES_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"recipe file '{path}' not found (also looked in {RECIPES_DIR})")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), [f"top level must be a mapping of sections, got {type(data).__name__}"])
    return data


# Parameters that belong to a component family rather than to one component: choosing another component of the
# family keeps them (unless the new choice sets them), so `projector.name=linear` over the default compares linear
# with mlp at the same output norm instead of silently dropping it. A factory that cannot take one runs where the
# value is null; any other value is refused when the recipe loads (check_components) and, for a recipe made in code,
# when the model is built (vlkit.model.build_vision).
FAMILY_PARAMS: dict[str, tuple[str, ...]] = {"projector": ("out_norm",)}


def family_param_refusal(section: str, name: str, key: str, value: Any, source: str) -> str:
    return (f"{section} '{name}' ({source}) takes no {key}, but the recipe asks for {section}.{key}={value!r} (kept "
            f"from the {section} it replaces); add {section}.{key}=null to run it without")


def _swapped(section: str, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Section ``section`` after choosing another component: ``new``, plus the family's parameters ``old`` set."""
    out = copy.deepcopy(new)
    for key in FAMILY_PARAMS.get(section, ()):
        if key in old and key not in out:
            out[key] = copy.deepcopy(old[key])
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and "name" not in v:
            out[k] = deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and v.get("name") == out[k].get("name"):
            out[k] = deep_merge(out[k], v)  # same component: merge params
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _swapped(k, out[k], v)  # a different component replaces the section but the family's params
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_recipe_dict(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw dict of a recipe with its ``base:`` chain merged in."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(str(path), ["'base:' chain forms a cycle: " + " -> ".join(str(p) for p in _seen + (path,))])
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict[str, Any] = {}
    for b in bases:
        bpath = (path.parent / str(b))
        if not bpath.exists():
            raise ConfigError(str(path), [f"base: file '{b}' not found (looked for {bpath})"])
        merged = deep_merge(merged, read_recipe_dict(bpath, _seen + (path,)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override '{text}' is not of the form key.path=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override '{text}' has an empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if len(path) > 1 and path[-1] == "name" and isinstance(node.get("name"), str) and node.get("name") != value:
        # choosing another component (``projector.name=...``; not the recipe's own top-level ``name``) drops the
        # previous one's parameters (they belong to it), num_tokens too: the default's ``pooled`` 16 must not follow
        # ``tokens.name=cls`` (one token), and a count for the new component is given beside its name; the family's
        # own parameters (FAMILY_PARAMS) stay
        kept = _swapped(path[-2], node, {})
        node.clear()
        node.update(kept)
    node[path[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    # component choices first so that their parameters given in the same call are kept
    parsed = [parse_override(o) for o in overrides]
    parsed.sort(key=lambda kv: 0 if kv[0][-1] == "name" else 1)
    for path, value in parsed:
        set_path(data, path, value)
    return data


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Valid keys at a location inside the Recipe schema (for suggestions)."""
    model: Any = Recipe
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(getattr(model, "model_fields", {}) or {})


def _format_pydantic(source: str, exc: ValidationError, overridden: set[str]) -> list[str]:
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        origin = " (set on the command line)" if key in overridden else ""
        if err["type"] == "extra_forbidden":
            parent, last = loc[:-1], loc[-1]
            if parent and parent[0] == "stages" and len(parent) == 2:
                valid = list(StageConfig.model_fields)
            elif parent == ("stages",):
                valid = []
            else:
                valid = _fields_at(parent)
            out.append(f"{source}: {key}{origin}: unknown key.{suggest(str(last), valid)}"
                       + (f" Valid keys here: {', '.join(valid)}" if valid else ""))
        elif err["type"] == "missing":
            out.append(f"{source}: {key}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            out.append(f"{source}: {key}{origin}: {msg}{got}")
    return out


def check_components(recipe: Recipe, source: str) -> list[str]:
    """Registry names exist and parameters match the factories' signatures."""
    errors = []
    for section, family in COMPONENT_SECTIONS.items():
        comp: Component = getattr(recipe, section)
        reg = FAMILIES[family]
        try:
            reg.get(comp.name)
        except RegistryError as exc:
            errors.append(f"{source}: {section}.name: {exc}")
            continue
        params = comp.params()
        bad = SUPPLIED.get(section, set()) & set(params)
        for b in sorted(bad):
            what = "the LLM's text-embedding norm" if b == "text_norm" else "the encoder/LLM dims"
            errors.append(f"{source}: {section}.{b}: set by vlkit from {what}; remove it")
        params = {k: v for k, v in params.items() if k not in bad}
        for key in FAMILY_PARAMS.get(section, ()):
            if key in params and not reg.accepts(comp.name, key):
                value = params.pop(key)
                if value is not None:  # null asks for nothing; anything else would be silently lost
                    why = family_param_refusal(section, comp.name, key, value, reg.source(comp.name))
                    errors.append(f"{source}: {section}.{key}: {why}")
        if section == "projector":
            params = {**params, "in_dim": 1, "out_dim": 1, "num_tokens": params.get("num_tokens")}
        if section == "fusion":
            import inspect

            if "llm" in inspect.signature(reg.get(comp.name)).parameters:
                params = {**params, "llm": None}
        if section == "tokens":
            params = {**params, "num_tokens": params.get("num_tokens")}
        problems = reg.check_params(comp.name, params)
        for msg in problems:
            errors.append(f"{source}: {section}: {msg}")
        if section == "fusion" and not problems and "llm" not in params:
            # a fusion that needs no LLM is cheap to build: its own checks (fusion.cells) run at load time
            try:
                reg.create(comp.name, **params)
            except (ValueError, TypeError) as exc:
                msg = str(exc)
                errors.append(f"{source}: {msg}" if msg.startswith("fusion.") else f"{source}: fusion: {msg}")
    return errors


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check: bool = True) -> Recipe:
    """Read, merge ``base:``, apply ``key.path=value`` overrides, validate. Raises :class:`ConfigError`."""
    p = find_recipe(path)
    source = str(path)
    data = read_recipe_dict(p)
    try:
        data = apply_overrides(data, list(overrides))
    except ValueError as exc:
        raise ConfigError(source, [str(exc)]) from exc
    return validate_recipe(data, source, {o.partition("=")[0].strip() for o in overrides}, check=check)


def validate_recipe(data: dict[str, Any], source: str, overridden: set[str] = frozenset(), check: bool = True) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _format_pydantic(source, exc, set(overridden))) from None
    if check:
        errors = check_components(recipe, source) + check_lora_once(recipe, source) + check_expect(recipe, source)
        if errors:
            raise ConfigError(source, errors)
    return recipe


def check_lora_once(recipe: Recipe, source: str) -> list[str]:
    """LoRA adapters are attached once per run, by the first stage that trains them, and later stages train the
    same adapters: a later stage's different ``lora:`` would be silently ignored, so it is an error."""
    lora_stages = [s for s in recipe.train.stages if s in recipe.stages and recipe.stages[s].llm == "lora"]
    if len(lora_stages) < 2:
        return []
    first = lora_stages[0]
    ref = recipe.stages[first].lora.model_dump()
    errors = []
    for name in lora_stages[1:]:
        for key, value in recipe.stages[name].lora.model_dump().items():
            if value != ref[key]:
                errors.append(f"{source}: stages.{name}.lora.{key}: {value!r}, but the LoRA adapters are attached once, "
                              f"by stage '{first}' (stages.{first}.lora.{key}: {ref[key]!r}), and stage '{name}' "
                              f"trains those; set the same value in both stages")
    return errors


def grid_axes(grid: dict[str, Any] | None) -> dict[str, list[Any]]:
    """A ``grid:`` block's axes (``seeds`` is not an axis), each a list of values."""
    return {k: (v if isinstance(v, list) else [v]) for k, v in (grid or {}).items() if k != "seeds"}


def eval_question_types(recipe: Recipe) -> list[str] | None:
    """Question types of the last stage's evaluation set when known before a run (the toy world's), else None."""
    eval_data = recipe.stages[recipe.train.stages[-1]].eval_data
    if eval_data and eval_data.startswith("toy:"):
        from vlkit.data.toy import QUESTION_TYPES

        return list(QUESTION_TYPES)
    return None


def check_expect(recipe: Recipe, source: str, axes: dict[str, list[Any]] | None = None) -> list[str]:
    """Problems in ``expect:``: its grammar, and its metrics and axis values against the grid (``axes``, else the
    recipe's own ``grid:``; a run's recipe has none, so only the grammar and metric names are checked)."""
    if recipe.expect is None:
        return []
    from vlkit.ablate.expect import check_expectations

    if axes is None and recipe.grid is not None:
        axes = grid_axes(recipe.grid)
    return check_expectations(recipe.expect, axes, source, eval_question_types(recipe))[1]


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
