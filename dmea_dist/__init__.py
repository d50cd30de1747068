"""dmea-dist: distributed lifelong sequence generation with DMEA on GPT-2.

The package has no side effects on import: heavy dependencies (Ray, DeepSpeed,
MLflow) are imported only by the modules that own them.
"""

__version__ = "0.1.0"
