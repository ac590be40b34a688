"""The paper's SAE-level feature-quality metrics (Gao et al. 2024, §4), computed by `saescope eval`:
probe loss (probe.py, on the corpus's labels from labels.py) and ablation sparsity (ablation.py).
Definitions: docs/concepts.md."""
