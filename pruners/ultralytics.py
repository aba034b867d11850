"""``pruners.ultralytics``: the Ultralytics integration (see ``pruners/integrations/ultralytics.py``)."""

from .integrations.ultralytics import (is_pruned, load_pruned, prune_yolo, with_model,
                                       yolo_batches, yolo_loss)
from .integrations.ultralytics import __getattr__  # noqa: F401 - PrunedYOLO, built lazily

__all__ = ["prune_yolo", "load_pruned", "PrunedYOLO", "with_model", "yolo_batches", "yolo_loss",
           "is_pruned"]
