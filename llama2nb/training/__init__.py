"""The PyTorch half of llama2nb: model, data preparation, training loop and export.

Everything under this package may import torch; nothing outside it does at import time.
"""
