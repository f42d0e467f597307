"""Random weights at a model's real shapes, only when a recipe asks (``encoder.random_init=true``,
``llm.random_init=true``).

The architecture comes from the model's published ``config.json`` through the planner's lookup
(:func:`vlkit.plan.configs.load_config`: a local dir, the HF cache, the built-in table of published configs, the hub
only when online), so the real recipe builds offline at its true size. Nothing falls back to random weights by
itself: without ``random_init`` a missing checkpoint is an error (``_hf_load``). A component built this way carries
``random_weights = True``; :func:`random_weight_parts` lists them and :func:`tag_console` makes every line a run
prints say so.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

RANDOM_WEIGHTS_ATTR = "random_weights"  # set to True on a component built with random_init
NOTE = "RANDOM WEIGHTS"


def published_config(model: str, sub: str | None = None) -> Any:
    """A transformers config for ``model`` from its published ``config.json`` (no weights read). ``sub`` picks a
    full CLIP/SigLIP config's tower (``vision_config``)."""
    from transformers import AutoConfig

    from vlkit.published_configs import load_config

    try:
        loaded = load_config(model)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise ValueError(f"random_init: no config for '{model}' ({exc})") from exc
    data = dict(loaded.data)
    if sub and isinstance(data.get(sub), dict):
        data = dict(data[sub])
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"random_init: the config of '{model}' ({loaded.source}) has no model_type")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"):
        data.pop(key, None)
    return AutoConfig.for_model(model_type, **data)


@contextlib.contextmanager
def fixed_seed(seed: int = 0) -> Iterator[None]:
    """Random weights as a function of the config alone (a run's rebuilt model for ``vlkit eval`` has the weights it
    trained with), without touching the caller's RNG streams."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def mark_random(module: nn.Module) -> nn.Module:
    setattr(module, RANDOM_WEIGHTS_ATTR, True)
    return module


def random_weight_parts(model: nn.Module) -> list[str]:
    """The components of a VLM (``encoder``, ``llm``, ...) whose weights were made at random (``random_init``)."""
    parts = ("encoder", "tokens", "projector", "fusion", "llm")
    return [p for p in parts if getattr(getattr(model, p, None), RANDOM_WEIGHTS_ATTR, False)]


def notice(parts: list[str]) -> str:
    """The words every printed result carries when some weights are random (empty when none are)."""
    return f"[{NOTE}: {', '.join(parts)}] " if parts else ""


def progress_label(model: nn.Module, label: str) -> str:
    """A progress bar's description (rich markup): ``label``, after the notice when some weights are random."""
    from rich.markup import escape

    return escape(notice(random_weight_parts(model))) + label


@contextlib.contextmanager
def results_say_random(console: Any, model: nn.Module) -> Iterator[None]:
    """Within the block every ``console.print`` carries :func:`notice` when ``model`` has random weights."""
    with contextlib.ExitStack() as stack:
        tag_console(console, random_weight_parts(model), stack)
        yield


def tag_console(console: Any, parts: list[str], stack: contextlib.ExitStack) -> None:
    """Prefix every ``console.print`` with :func:`notice` until ``stack`` closes (nothing when ``parts`` is empty)."""
    if not parts:
        return
    from rich.control import Control
    from rich.markup import escape

    prefix = escape(notice(parts))
    plain = console.print

    def print_tagged(*objects: Any, **kwargs: Any) -> None:
        if not objects or any(isinstance(o, Control) for o in objects):  # blank lines, cursor control: untouched
            plain(*objects, **kwargs)
        elif all(isinstance(o, str) for o in objects):
            plain(prefix + str(objects[0]), *objects[1:], **kwargs)
        else:  # a table or other renderable: the notice on its own line just above it
            plain(notice(parts).strip(), style="bold red", markup=False, highlight=False)
            plain(*objects, **kwargs)

    console.print = print_tagged
    stack.callback(lambda: console.__dict__.pop("print", None))
