"""The llama2nb command line: Click parsing and Rich display only; the work lives in the modules."""

import click

from .training.commands import TRAINING_COMMANDS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llama2nb")
def main() -> None:
    """llama2nb: train a baby Llama 2 in PyTorch, sample from it with Numba kernels."""


for _command in TRAINING_COMMANDS:
    main.add_command(_command)
