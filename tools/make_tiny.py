"""Write tiny models for tests and experiments, built from configs (no download):

    python tools/make_tiny.py --out tiny/            # llm/ (Llama), qwen2/, clip/, siglip/, open_clip/, timm/

Each is saved with its library's own save function and loads through the real loading code, e.g.
``model.llm.path: tiny/llm`` and ``model.encoders.image: {name: hf_vision, path: tiny/clip}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmpost.synthetic.tiny_llm import make_tiny_llm, make_tiny_tokenizer
from mmpost.synthetic.tiny_vision import make_tiny_clip, make_tiny_open_clip, make_tiny_siglip, make_tiny_timm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hidden-size", type=int, default=64, help="LLM width")
    parser.add_argument("--layers", type=int, default=2, help="LLM decoder layers")
    args = parser.parse_args()
    out: Path = args.out
    made = {}
    for arch in ("llama", "qwen2"):
        folder = out / ("llm" if arch == "llama" else arch)
        tokenizer = make_tiny_tokenizer(folder)
        made[arch] = str(make_tiny_llm(folder, tokenizer, arch=arch, hidden_size=args.hidden_size, layers=args.layers))
    made["clip"] = str(make_tiny_clip(out / "clip"))
    made["siglip"] = str(make_tiny_siglip(out / "siglip"))
    model_cfg, weights = make_tiny_open_clip(out / "open_clip")
    made["open_clip"] = {"arch": "tiny", "model_cfg": model_cfg, "weights": str(weights)}
    name, kwargs, weights = make_tiny_timm(out / "timm")
    made["timm"] = {"model": name, "model_kwargs": kwargs, "weights": str(weights)}
    (out / "tiny.json").write_text(json.dumps(made, indent=2))
    print(json.dumps(made, indent=2))


if __name__ == "__main__":
    main()
