"""Linear probe of an object's shape in toy-clip's features at the layer the default VLM reads (layer -2).

    python tools/shape_probe.py DIR_OR_CHECKPOINT [--n-train 2000] [--layer -2] [--data DIR]

DIR_OR_CHECKPOINT is a saved toy-clip (a CLIPModel or CLIPVisionModel directory) or a pretraining checkpoint
(``state.pt`` of ``vlkit toy pretrain`` or of ``models.train_clip`` with a StepCheckpoint). Prints the 5-way shape
probe's val accuracy (softmax regression on standardised features, 300 epochs; chance 0.20) from two inputs per
object: its cell's mean patch token, and the default's 2x2-pooled token at the object's centre. Fit on the objects
of the first N train images, scored on every val object. The data is the shipped toy world's unless --data is given.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def vision_tower(src: Path):
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    if src.name.endswith(".pt"):
        state = torch.load(src, weights_only=True)["model"]
        clip = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")} or state  # cells head off
        from vlkit.toyworld import resolve_toy

        config = CLIPConfig.from_pretrained(resolve_toy("toy:clip"))
        model = CLIPModel(config)
        model.load_state_dict(clip)
        return model.vision_model.eval()
    config = json.loads((src / "config.json").read_text())
    cls = CLIPModel if config.get("model_type") == "clip" else CLIPVisionModel
    model = cls.from_pretrained(src)
    return (model.vision_model if hasattr(model, "vision_model") else model).eval()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--layer", type=int, default=-2)
    ap.add_argument("--data", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from vlkit.data import toy
    from vlkit.toyworld import resolve_toy
    from vlkit.toyworld.models import load_images, normalize
    from vlkit.toyworld.probes import softmax_probe

    torch.manual_seed(0)
    data = args.data or Path(resolve_toy("toy:data"))
    meta = json.loads((data / "meta.json").read_text())
    grid, size = meta["grid"], meta["image_size"]
    model = vision_tower(args.source)
    patch = model.config.patch_size
    side = size // patch

    def features(scenes):  # [N, side, side, D] at the chosen layer
        images, out = load_images(data, scenes), []
        with torch.no_grad():
            for k in range(0, len(images), 250):
                h = model(pixel_values=normalize(images[k:k + 250]), output_hidden_states=True).hidden_states
                out.append(h[args.layer][:, 1:].reshape(-1, side, side, h[args.layer].shape[-1]))
        return torch.cat(out)

    cell_of = ((torch.arange(side) * patch + patch / 2) * grid / size).floor().long()

    def per_object(scenes, feats):
        cell, pooled, labels = [], [], []
        for i, s in enumerate(scenes):
            for o in s["objects"]:
                mask = (cell_of[:, None] == o["row"]) & (cell_of[None, :] == o["col"])
                cell.append(feats[i][mask].mean(0))
                r, c = (min(int((v + 0.5) * size / grid / patch) // 2, side // 2 - 1) for v in (o["row"], o["col"]))
                pooled.append(feats[i, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean((0, 1)))
                labels.append(toy.SHAPES.index(o["shape"]))
        return {"cell_mean": torch.stack(cell), "pooled_token": torch.stack(pooled)}, torch.tensor(labels)

    train = toy.load_scenes(data, "train")[:args.n_train]
    val = toy.load_scenes(data, "val")
    x_tr, y_tr = per_object(train, features(train))
    x_te, y_te = per_object(val, features(val))
    result = {k: softmax_probe(x_tr[k], y_tr, x_te[k], y_te, len(toy.SHAPES), epochs=300, seed=0) for k in x_tr}
    out = {"source": str(args.source), "layer": args.layer, "n_train_images": len(train),
           "n_val_objects": int(len(y_te)), "shape_probe": result}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
