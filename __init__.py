"""prep: data preparation for encoder-based zero-fine-tuning image customization."""

__version__ = "0.1.0"
