"""dmea-dist: distributed lifelong sequence generation with DMEA on GPT-2.

The package has no side effects on import: heavy dependencies (Ray, DeepSpeed,
MLflow) are imported only by the modules that own them.

    import dmea_dist
    served = dmea_dist.load_task_model("runs/quickstart-...", "synth.restaurant.00")   # or a run id, models:/...
    served.generate(["inform(name='x';food='thai')"])
"""

from dmea_dist.errors import DmeaError

__version__ = "0.1.0"


def load_task_model(source, task=None, **kwargs):
    """Recorded tasks of a run, ready to answer: `dmea_dist.serving.load_task_model` (imported on first use)."""
    from dmea_dist.serving import load_task_model as load

    return load(source, task, **kwargs)


__all__ = ["DmeaError", "__version__", "load_task_model"]
