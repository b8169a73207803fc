"""Demo and test material: the built-in synthetic data (coloured shapes, tones, preference pairs, counting
prompts), written in every format the readers take, and tiny models built from configs (LLMs with a tokenizer
trained on the data, vision and audio towers, pretrained for seconds on synthetic media).

Nothing under ``mmpost`` outside this package, the demo and the tools imports it: the data readers and the
models never depend on how the demo makes its material.
"""
