"""lmms-eval adapter: the ``vlkit`` model resolves through lmms-eval's entry-point registry, and its
``generate_until`` / ``loglikelihood`` give what vlkit itself computes for the same prompts and images."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is not installed (pip install 'vlkit[lmms]')")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from rich.console import Console  # noqa: E402

from vlkit.data.llava import IGNORE, ImageTransform, load_image  # noqa: E402
from vlkit.evaluate import generate_answers, prompt_example  # noqa: E402
from vlkit.lmms_eval_adapter import VlkitLMM, manifest, truncate_at  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ONE_STEP = ["stages.align.max_steps=1", "stages.align.batch_size=4", "stages.instruct.max_steps=1",
            "stages.instruct.batch_size=4", "stages.align.eval_data=null", "stages.instruct.eval_data=null"]
TASK, SPLIT = "toy_vqa", "val"
N = 3
MAX_NEW = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is much faster than several on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tiny_toy_world, tmp_path_factory) -> Path:
    from vlkit.config import load_recipe
    from vlkit.train import train

    run = tmp_path_factory.mktemp("lmms") / "run"
    train(load_recipe("mlp_patch", ONE_STEP), run, console=Console(quiet=True))
    return run


@pytest.fixture(scope="module")
def records(tiny_toy_world) -> list[dict]:
    recs = json.loads((tiny_toy_world.data_dir / "instruct_val.json").read_text())
    return [r for r in recs if r.get("image")][:N]


@pytest.fixture(scope="module")
def lm(run_dir, records, tiny_toy_world) -> VlkitLMM:
    """Made the way lmms-eval's evaluator makes it: arg string, extra config, then task_dict."""
    model = VlkitLMM.create_from_arg_string(f"run={run_dir},max_new_tokens={MAX_NEW}",
                                            {"batch_size": "1", "max_batch_size": None, "device": "cpu"})
    images = tiny_toy_world.data_dir / "images"
    docs = [{"question": question(r), "answer": r["answer"], "image": load_image(images / r["image"])}
            for r in records]
    model.task_dict[TASK] = {SPLIT: docs}
    return model


@pytest.fixture(scope="module")
def answers(lm, records, tiny_toy_world) -> list[str]:
    """vlkit's own greedy answers (``vlkit.evaluate.generate_answers``) to the records."""
    return generate_answers(lm.model, records, tiny_toy_world.data_dir / "images", lm.transform, lm.device,
                            batch_size=1, max_new_tokens=MAX_NEW)


def question(rec: dict) -> str:
    """The record's question without the ``<image>\\n`` placeholder (lmms-eval contexts usually have none)."""
    return rec["conversations"][0]["value"].replace("<image>\n", "")


def doc_to_visual(doc: dict) -> list:
    return [doc["image"]]


def gen_requests(contexts: list[str], gen_kwargs: dict) -> list[Instance]:
    return [Instance("generate_until", (ctx, dict(gen_kwargs), doc_to_visual, i, TASK, SPLIT), idx=0,
                     metadata={"task": TASK, "doc_id": i, "repeats": 1}) for i, ctx in enumerate(contexts)]


def ll_requests(pairs: list[tuple[int, str, object]]) -> list[Instance]:
    return [Instance("loglikelihood", (ctx, cont, doc_to_visual, doc_id, TASK, SPLIT), idx=0,
                     metadata={"task": TASK, "doc_id": doc_id, "repeats": 1}) for doc_id, ctx, cont in pairs]


def direct_loss_sum(model, rec: dict, image_root: Path, continuation: str) -> tuple[float, bool]:
    """vlkit's own loss over ``continuation`` after ``rec``'s generation prompt and image: (loss_sum, greedy)."""
    tok = model.tokenizer
    ex, _ = prompt_example(rec, tok, model.image_token_id, model.image_span)
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ex.input_ids + cont])
    labels = torch.tensor([[IGNORE] * len(ex.input_ids) + cont])
    enc = model.encoder
    pixels = ImageTransform(enc.image_size, enc.mean, enc.std)(load_image(image_root / rec["image"]))[None]
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids), labels, pixel_values=pixels, image_index=torch.tensor([0]),
                    return_logits=True)
    return float(out.loss_sum), bool((out.logits.argmax(-1) == torch.tensor(cont)).all())


def greedy_ids(model, rec: dict, image_root: Path, max_new_tokens: int) -> list[int]:
    """The token ids vlkit's greedy decoding produces after ``rec``'s prompt, end-of-turn tokens dropped."""
    tok = model.tokenizer
    ex, _ = prompt_example(rec, tok, model.image_token_id, model.image_span)
    enc = model.encoder
    pixels = ImageTransform(enc.image_size, enc.mean, enc.std)(load_image(image_root / rec["image"]))[None]
    ids = torch.tensor([ex.input_ids])
    out = model.generate(ids, torch.ones_like(ids), pixel_values=pixels, image_index=torch.tensor([0]),
                         max_new_tokens=max_new_tokens)[0].tolist()
    return [t for t in out if t not in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"))]


# ---- registration ----------------------------------------------------------------------------------------------
def test_entry_point_declared_and_resolved():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["entry-points"]["lmms_eval.models"]["vlkit"] == "vlkit.lmms_eval_adapter:manifest"
    assert any(d.startswith("lmms-eval") for d in meta["optional-dependencies"]["lmms"])

    from lmms_eval.models.registry_v2 import ModelManifest, ModelRegistryV2

    m = manifest()
    assert isinstance(m, ModelManifest) and m.model_id == "vlkit"
    reg = ModelRegistryV2()
    reg.register_manifest(m)
    assert reg.get_model_class("vlkit") is VlkitLMM
    assert issubclass(VlkitLMM, lmms) and VlkitLMM.is_simple

    from importlib.metadata import distribution, entry_points

    if not any(ep.name == "vlkit" for ep in entry_points(group="lmms_eval.models")):
        seen = getattr(distribution("vlkit"), "_path", "?")
        pytest.skip(f"the vlkit metadata on sys.path ({seen}) predates the lmms_eval.models entry point; "
                    "reinstall with `pip install -e .` (and refresh or delete a stale vlkit.egg-info in the repo)")
    reg = ModelRegistryV2()
    reg.load_entrypoint_manifests(group="lmms_eval.models")
    assert reg.resolve("vlkit").class_path == "vlkit.lmms_eval_adapter.VlkitLMM"
    assert reg.get_model_class("vlkit") is VlkitLMM
    from lmms_eval.models import get_model  # lmms-eval's global registry, as the CLI uses it

    assert get_model("vlkit") is VlkitLMM


def test_import_vlkit_needs_no_lmms_eval_and_adapter_says_what_is_missing():
    code = ("import sys; sys.modules['lmms_eval'] = None; import vlkit\n"
            "try:\n    import vlkit.lmms_eval_adapter\nexcept ImportError as e:\n    print('ERR', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ERR vlkit.lmms_eval_adapter needs lmms-eval" in res.stdout and "vlkit[lmms]" in res.stdout


# ---- the model through lmms-eval's API ---------------------------------------------------------------------------
def test_generate_until_matches_vlkit_generate_answers(lm, records, answers, tiny_toy_world):
    model = lm.model
    for rec in records:  # the adapter's prompt is vlkit's own generation prompt, with or without a placeholder
        want = prompt_example(rec, model.tokenizer, model.image_token_id, model.image_span)[0].input_ids
        assert lm.prompt_ids(question(rec), 1) == want
        assert lm.prompt_ids("<image>\n" + question(rec), 1) == want
    contexts = [question(r) for r in records]
    got = lm.generate_until(gen_requests(contexts, {"max_new_tokens": MAX_NEW, "temperature": 0, "do_sample": False}))
    assert got == answers
    # VLM.generate gets the very tensors vlkit's generate_answers gives it (whatever this tiny model answers)
    seen: dict[str, list] = {"vlkit": [], "lmms": []}
    real = model.generate
    try:
        for key in seen:
            model.generate = lambda *a, _key=key, **k: seen[_key].append((a, k)) or real(*a, **k)
            if key == "vlkit":
                generate_answers(model, records, tiny_toy_world.data_dir / "images", lm.transform, lm.device,
                                 batch_size=1, max_new_tokens=MAX_NEW)
            else:
                lm.generate_until(gen_requests(contexts, {"max_new_tokens": MAX_NEW}))
    finally:
        del model.generate
    assert len(seen["vlkit"]) == len(seen["lmms"]) == len(records)
    for (a1, k1), (a2, k2) in zip(seen["vlkit"], seen["lmms"]):
        assert all(torch.equal(x, y) for x, y in zip(a1, a2))
        assert torch.equal(k1["pixel_values"], k2["pixel_values"])
        assert torch.equal(k1["image_index"], k2["image_index"])
        assert (k1["max_new_tokens"], k1.get("do_sample", False)) == (k2["max_new_tokens"], k2["do_sample"])
    # batching does not change answers; max_new_tokens comes from the model args when the task sets none
    lm.batch_size_per_gpu = 2
    try:
        got_b = lm.generate_until(gen_requests(["<image>\n" + c for c in contexts], {}))
    finally:
        lm.batch_size_per_gpu = 1
    assert got_b == answers


def test_generate_until_honours_until_and_generation_kwargs(lm, records, answers, tiny_toy_world):
    tok = lm.tokenizer
    contexts = [question(r) for r in records]
    # on the model's real output: cut at the earliest stop string (raw text, before stripping)
    raw_ids = greedy_ids(lm.model, records[0], tiny_toy_world.data_dir / "images", MAX_NEW)
    raw = tok.decode(raw_ids, skip_special_tokens=True)
    assert raw.strip() == answers[0]
    if raw:
        stop = raw[len(raw) // 2]
        want = raw[:raw.find(stop)].strip()
        assert lm.generate_until(gen_requests(contexts[:1], {"until": [stop, "\u2603"]})) == [want]
        assert lm.generate_until(gen_requests(contexts[:1], {"until": stop})) == [want]
    # on a known output (VLM.generate replaced): earliest of several stops, a plain string, empty stops ignored
    fixed = tok("blue circle\n\nred square", add_special_tokens=False)["input_ids"] + [
        tok.convert_tokens_to_ids("<|im_end|>")]
    lm.model.generate = lambda *a, **k: torch.tensor([fixed])
    try:
        for until, want in ((["\n\n"], "blue circle"), (["square", "circle"], "blue"), ("red", "blue circle"),
                            (["", "\u2603"], "blue circle\n\nred square"), ([], "blue circle\n\nred square")):
            assert lm.generate_until(gen_requests(contexts[:1], {"until": until})) == [want], until
    finally:
        del lm.model.generate

    # max_new_tokens / temperature / do_sample / top_p reach VLM.generate
    calls: list[dict] = []
    real = lm.model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    lm.model.generate = spy
    try:
        lm.generate_until(gen_requests(contexts[:1], {"max_new_tokens": 3, "temperature": 0.7, "top_p": 0.9}))
        lm.generate_until(gen_requests(contexts[:1], {"max_new_tokens": 2, "temperature": 0, "do_sample": True}))
        lm.generate_until(gen_requests(contexts[:1], {"max_new_tokens": 5, "temperature": 0.5, "do_sample": False}))
    finally:
        del lm.model.generate
    pick = [{k: c[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_p")} for c in calls]
    assert pick == [{"max_new_tokens": 3, "do_sample": True, "temperature": 0.7, "top_p": 0.9},
                    {"max_new_tokens": 2, "do_sample": False, "temperature": 1.0, "top_p": 1.0},
                    {"max_new_tokens": 5, "do_sample": False, "temperature": 1.0, "top_p": 1.0}]
    with pytest.raises(NotImplementedError, match="multi-round"):
        lm.generate_until_multi_round(gen_requests(contexts[:1], {}))


def test_loglikelihood_is_minus_vlkit_loss_sum(lm, records, answers, tiny_toy_world):
    image_root = tiny_toy_world.data_dir / "images"
    model, tok = lm.model, lm.tokenizer
    greedy = answers
    pairs, want = [], []
    for i, rec in enumerate(records):
        for cont in (rec["answer"], "no", greedy[i]):
            if not cont:
                continue
            loss_sum, is_greedy = direct_loss_sum(model, rec, image_root, cont)
            # lmms-eval puts its target_delimiter (" ") in front of each choice; dropped after the assistant header
            pairs.append((i, question(rec), " " + cont))
            want.append((-loss_sum, is_greedy))
    for batch_size in (1, 3):
        lm.batch_size_per_gpu = batch_size
        try:
            got = lm.loglikelihood(ll_requests(pairs))
        finally:
            lm.batch_size_per_gpu = 1
        assert [g[1] for g in got] == [w[1] for w in want]
        for g, w in zip(got, want):
            assert g[0] == pytest.approx(w[0], abs=1e-4, rel=1e-5)
            assert g[0] < 0
    # the token greedy decoding itself produces first is the greedy continuation
    first = greedy_ids(model, records[0], image_root, 1)
    text = tok.decode(first)
    if first and tok(text, add_special_tokens=False)["input_ids"] == first:
        lm.lstrip_continuation = False  # the greedy token may well be a space or newline: keep it
        try:
            assert lm.loglikelihood(ll_requests([(0, question(records[0]), text)]))[0][1] is True
        finally:
            lm.lstrip_continuation = True
    # doc_to_target as a callable on the document, and an empty continuation
    got = lm.loglikelihood(ll_requests([(0, question(records[0]), lambda doc: doc["answer"]),
                                        (0, question(records[0]), "")]))
    assert got[0][0] == pytest.approx(-direct_loss_sum(model, records[0], image_root, records[0]["answer"])[0],
                                      abs=1e-4)
    assert got[1] == (0.0, True)


def test_bad_visuals_are_refused_clearly(lm, records):
    def video(doc):
        return ["/some/clip.mp4"]

    req = Instance("generate_until", ("q", {}, video, 0, TASK, SPLIT), idx=0,
                   metadata={"task": TASK, "doc_id": 0, "repeats": 1})
    with pytest.raises(ValueError, match="takes images"):
        lm.generate_until([req])
    with pytest.raises(ValueError, match="placeholder"):
        lm.generate_until(gen_requests(["<image> <image> two?"], {}))
