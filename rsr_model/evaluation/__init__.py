"""Evaluation: the paper's tables in small (`python -m rsr_model evaluate`).

- `scorer`: GenEval-style detection and scoring of shapes-world images.
- `check`: how often the scorer is right (`evaluate --scorer-check`).
"""
