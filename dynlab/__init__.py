"""dynlab: learning dynamics of LLM finetuning on PyTorch Lightning."""

__version__ = "0.1.0"
