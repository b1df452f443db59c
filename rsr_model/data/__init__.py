"""Embedded data sets (nothing is downloaded).

- `rsr_model.data.shapes`: generated coloured shapes with captions, their ground-truth
  scenes (the scorer that checks images against them is `evaluation.scorer`).
- `rsr_model.data.digits`: scikit-learn's bundled 8x8 digits, upsampled, with labels.

Submodules are not imported here, so importing one does not pull in the other's
dependencies (digits needs torch and scikit-learn; shapes only numpy and scipy).
"""
