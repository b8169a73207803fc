"""Stages: one file each, with its options, its loss and what it needs from a batch.

To add one, write a module here with a class whose constructor takes the stage's options and add
one line below.
"""

from mmpost.registry import Registry

STAGES = Registry("stage")
STAGES.add("align", "mmpost.stages.align:Align")
STAGES.add("sft", "mmpost.stages.sft:SFT")
STAGES.add("dpo", "mmpost.stages.dpo:DPO")
STAGES.add("grpo", "mmpost.stages.grpo:GRPO")
STAGES.add("distill", "mmpost.stages.distill:Distill")
