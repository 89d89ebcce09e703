"""`python -m llama2nb.training ...` is `llama2nb ...`: torchrun needs a module to start, e.g.
`torchrun --standalone --nproc_per_node=2 -m llama2nb.training train --preset tiny ...`."""

from llama2nb.cli import main

if __name__ == "__main__":
    main(prog_name="llama2nb")
