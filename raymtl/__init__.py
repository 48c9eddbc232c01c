"""raymtl: multi-task, multi-dataset PyTorch training on Ray."""

__version__ = "0.1.0"


def load(path, map_location="cpu"):
    """Load a saved model (any checkpoint folder) ready for prediction: see `raymtl.models.artifact`."""
    from raymtl.models.artifact import load as load_artifact

    return load_artifact(path, map_location)
