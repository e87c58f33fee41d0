"""Input pipeline: sources, host geometry (views), on-device colour augmentation."""
