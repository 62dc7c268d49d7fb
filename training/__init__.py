"""HDM pretraining: a plain-PyTorch DDP launcher (`python -m training.train`), data, recipes and export."""
