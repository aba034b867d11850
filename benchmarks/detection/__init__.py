"""The detection benchmark: a generated digits dataset and YOLO train -> prune -> fine-tune."""
