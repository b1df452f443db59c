"""Evaluation: the paper's tables in small (`python -m rsr_model evaluate`; docs/evaluation.md).

- `scorer`: GenEval-style detection and scoring of shapes-world images, from pixels alone.
- `check`: how often the scorer is right (`evaluate --scorer-check`).
- `prompts`: the held-apart evaluation prompt set and GenEval metadata for it.
- `export`: samples in GenEval's and DPG-Bench's folder layouts (`evaluate --export`).
- `lora_export`: one expert as a diffusers/peft LoRA (`export-lora`).
- `table`, `routing`: the ablation table with routing figures per row (`evaluate --table`).
- `digits_quality`: dit-digits FD, precision, recall (`evaluate --class-conditioned`).
- `planning`: the hook for FrozenLake planning figures (`evaluate --planning`).
- `cli`, `markdown`: the subcommand and its tables.
"""
