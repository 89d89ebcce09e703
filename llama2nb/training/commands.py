"""Click commands for the PyTorch half (data, download, train, export, eval).

Importing this module must not import torch: commands import it inside their bodies, so that
`llama2nb sample` works where torch is not installed.
"""

import click

TRAINING_COMMANDS: list[click.Command] = []
