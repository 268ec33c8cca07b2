"""tunesmith: fine-tune pretrained models from a short YAML recipe."""
__version__ = "0.1.0"
