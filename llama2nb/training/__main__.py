"""`python -m llama2nb.training COMMAND ...`: the training commands (data, download, train,
export, export-tokenizer, eval) as `llama2nb COMMAND ...` runs them. It exists because torchrun
starts modules, e.g. `torchrun --standalone --nproc_per_node=2 -m llama2nb.training train --preset
tiny ...`; it builds its own group from training.commands instead of importing the CLI above it.
"""

import click

from .commands import TRAINING_COMMANDS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def training_main() -> None:
    """llama2nb's training commands (the same as `llama2nb COMMAND`)."""


for _command in TRAINING_COMMANDS:
    training_main.add_command(_command)

if __name__ == "__main__":
    training_main(prog_name="python -m llama2nb.training")
