"""The SAE benchmark suite (`saescope bench-sae`, issue 28): SAEBench's metrics that hold up, on CPU.

`suite.run_suite(BenchConfig) -> BenchResult` runs core metrics (core.py), k-sparse probing
(sparse_probing.py), the meta-SAE on decoder rows (meta_sae.py), interpretability from our explainers
(interpretability.py) and first-letter absorption where the model's first-letter probes are good enough
(absorption.py); saebench_json.py writes the results as SAEBench BaseEvalOutput JSON. Light to import:
the metric modules (torch) load when the suite runs.
"""
