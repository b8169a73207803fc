"""Qwen2-VL's multimodal rotary positions (M-RoPE): 3-D position ids (temporal, height, width) from the images'
grids, computed by the LMM so its decoder sees what ``Qwen2VLModel.get_rope_index`` feeds transformers' own.

Over each row's real tokens: a text token's three ids are its running position; an image's ``t x h x w``
merged tokens (``h``, ``w`` in patches over the merge size) take ``(p + i, p + j, p + k)`` for its grid cell
``(i, j, k)``, where ``p`` is the running position at the image, which then moves on by ``max(h, w)``.
Padding gets 0. Decoding continues every id row by one per new token (transformers' generation does this
with the prompt's ``position_ids``), which is what the released model's rope deltas give.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

import mmpost.families.qwen2_vl_text  # noqa: F401  (registers the text models' causal-LM classes)
from mmpost.interfaces import MediaBatch

if TYPE_CHECKING:
    from mmpost.model.lmm import LMM


class MRope:
    """The position scheme of Qwen2-VL / Qwen2.5-VL images (``mmpost.registry.POSITIONS`` name ``mrope``).

    Args:
        merge_size: patches per side merged into one token (the vision config's ``spatial_merge_size``).
    """

    def __init__(self, merge_size: int = 2) -> None:
        self.merge_size = merge_size

    def position_ids(
        self,
        model: LMM,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: Mapping[str, MediaBatch],
        media_repeat: int = 1,
    ) -> torch.Tensor:
        """``[3, B, T]`` ids; rows ``b*r .. b*r+r-1`` share sample b's images (``media_repeat`` r)."""
        image_id = model.placeholder_ids["image"]
        images = media.get("image")
        grids = images["grid_thw"].tolist() if images is not None else []
        out = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
        used = 0
        for group in range(0, input_ids.shape[0], media_repeat):
            taken = 0
            for row in range(group, group + media_repeat):
                real = attention_mask[row].bool()
                ids, taken = self._row(input_ids[row][real], image_id, grids[used:])
                out[:, row, real] = ids.to(out.device)
            used += taken
        if used != len(grids):
            raise ValueError(f"mrope: {len(grids)} image grids but the rows' image tokens hold {used} images")
        return out

    def _row(self, ids: torch.Tensor, image_id: int, grids: list[list[int]]) -> tuple[torch.Tensor, int]:
        """The ``[3, n]`` ids of one row's real tokens, and how many of ``grids`` its images used."""
        image_at = (ids == image_id).nonzero().flatten().tolist()
        pieces, position, done, cursor, k = [], 0, 0, 0, 0
        while cursor < len(image_at):
            if k >= len(grids):
                raise ValueError("mrope: a row has more image tokens than the batch has image grids")
            start = image_at[cursor]
            pieces.append(torch.arange(position, position + start - done).expand(3, -1))  # the text before it
            position += start - done
            t, h, w = grids[k][0], grids[k][1] // self.merge_size, grids[k][2] // self.merge_size
            cells = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
            pieces.append(cells.reshape(3, -1) + position)
            position += max(h, w)
            done, cursor, k = start + t * h * w, cursor + t * h * w, k + 1
        pieces.append(torch.arange(position, position + len(ids) - done).expand(3, -1))
        return torch.cat(pieces, dim=1), k

    def spec(self) -> dict[str, Any]:
        return {"name": "mrope", "merge_size": self.merge_size}
