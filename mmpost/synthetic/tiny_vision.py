"""Tiny vision towers of each encoder family, saved to disk, for tests and the offline demo.

Nothing is downloaded. Each function builds a seeded tiny model from a config and writes it the way
real checkpoints are written (transformers ``save_pretrained``, open_clip and timm state dicts in
safetensors), so the code under test goes through the real loading path.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _save_state(module: torch.nn.Module, path: Path) -> Path:
    # safetensors refuses shared or non-contiguous storage; a tiny model can afford copies
    save_file({k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def make_tiny_clip(
    out_dir: str | Path,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
) -> Path:
    """Saves a random ``CLIPVisionModel`` and a matching ``CLIPImageProcessor`` to ``out_dir``.

    Args:
        out_dir: directory to write (created if needed).
        image_size: input side; also the processor's resize and crop size.
        patch_size: ViT patch side.
        hidden_size: width of the tower.
        layers: number of encoder layers.
        heads: attention heads.
        seed: torch seed for the weights.

    Returns:
        ``out_dir`` as a Path, loadable with ``CLIPVisionModel.from_pretrained``.
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    out = Path(out_dir)
    config = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    torch.manual_seed(seed)
    CLIPVisionModel(config).save_pretrained(out)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor.save_pretrained(out)
    return out


def make_tiny_siglip(
    out_dir: str | Path,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
) -> Path:
    """Saves a random ``SiglipVisionModel`` and a matching ``SiglipImageProcessor`` to ``out_dir``.

    Args:
        out_dir: directory to write (created if needed).
        image_size: input side; also the processor's resize size.
        patch_size: ViT patch side.
        hidden_size: width of the tower.
        layers: number of encoder layers.
        heads: attention heads (also used by the pooling head).
        seed: torch seed for the weights.

    Returns:
        ``out_dir`` as a Path, loadable with ``SiglipVisionModel.from_pretrained``.
    """
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    out = Path(out_dir)
    config = SiglipVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    torch.manual_seed(seed)
    SiglipVisionModel(config).save_pretrained(out)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return out


def make_tiny_open_clip(
    out_dir: str | Path,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 32,
    layers: int = 2,
    head_width: int = 16,
    embed_dim: int = 16,
    seed: int = 0,
) -> tuple[dict[str, Any], Path]:
    """Saves a random full open_clip ``CLIP`` (ViT image tower, tiny text tower) to ``out_dir``.

    The directory is also an open_clip ``local-dir:`` model (``open_clip_config.json`` plus
    ``open_clip_model.safetensors``), so ``open_clip.create_model_and_transforms("local-dir:...")``
    loads it independently of mmpost.

    Args:
        out_dir: directory to write (created if needed).
        image_size: input side.
        patch_size: ViT patch side.
        width: width of the vision tower.
        layers: number of vision blocks.
        head_width: width per attention head (heads = width // head_width).
        embed_dim: joint embedding width.
        seed: torch seed for the weights.

    Returns:
        (model_cfg, weights path): the open_clip model config dict and the safetensors file.
    """
    import open_clip

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": patch_size,
            "width": width,
            "layers": layers,
            "head_width": head_width,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    weights = _save_state(model, out / "open_clip_model.safetensors")
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}, indent=2))
    return model_cfg, weights


def make_tiny_timm(out_dir: str | Path, seed: int = 0) -> tuple[str, dict[str, Any], Path]:
    """Saves a random tiny timm ViT (32x32 input, 8x8 patches, width 32, 2 blocks) with its classifier.

    The classifier is kept, as in released timm checkpoints, so loading exercises dropping it.

    Args:
        out_dir: directory to write (created if needed).
        seed: torch seed for the weights.

    Returns:
        (model name, model_kwargs, weights path) for ``TimmEncoder(model, weights, model_kwargs=...)``.
    """
    import timm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "vit_tiny_patch16_224"
    model_kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **model_kwargs)
    return name, model_kwargs, _save_state(model, out / "timm_vit_tiny.safetensors")


def pretrain_tiny_tower(
    tower_dir: str | Path, steps: int = 1000, batch_size: int = 32, lr: float = 1e-3, seed: int = 0
) -> dict[str, float]:
    """Pretrains a saved tiny CLIP / SigLIP tower on synthetic shapes, standing in for CLIP's pretraining.

    Real LMMs start from a pretrained tower; a random tiny one learns shapes only slowly through an
    LLM. This fits linear heads for colour, shape and count on the tower's mean last-layer features
    over freshly drawn scenes (their own random stream, never the dataset's images), then saves the
    tower back to ``tower_dir`` without the heads.

    Returns:
        the heads' accuracy on the last 10 batches, per attribute.
    """
    from tqdm.auto import tqdm
    from transformers import AutoImageProcessor, AutoModel

    from mmpost.synthetic.scenes import COLOURS, SHAPES, draw_scene

    tower_dir = Path(tower_dir)
    torch.manual_seed(seed)
    tower = AutoModel.from_pretrained(tower_dir, dtype=torch.float32)
    processor = AutoImageProcessor.from_pretrained(tower_dir)
    classes = {"colour": sorted(COLOURS), "shape": sorted(SHAPES), "count": [1, 2, 3]}
    width = tower.config.hidden_size
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in classes.items()})
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=lr)
    rng = random.Random(f"pretrain/{seed}")
    size = processor.crop_size["height"] if getattr(processor, "crop_size", None) else processor.size["height"]
    hits = {k: [] for k in classes}
    tower.train()
    for step in tqdm(range(steps), desc="pretrain tower", leave=False):
        scenes, images = zip(*(draw_scene(rng, max(size, 32)) for _ in range(batch_size)), strict=True)
        pixels = processor(list(images), return_tensors="pt")["pixel_values"]
        features = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1].mean(1)  # [B, D]
        loss = torch.zeros(())
        for key, values in classes.items():
            target = torch.tensor([values.index(getattr(s, key)) for s in scenes])
            logits = heads[key](features)
            loss = loss + torch.nn.functional.cross_entropy(logits, target)
            if step >= steps - 10:
                hits[key].append(float((logits.argmax(-1) == target).float().mean()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tower.eval()
    tower.save_pretrained(tower_dir)
    return {k: sum(v) / max(len(v), 1) for k, v in hits.items()}
