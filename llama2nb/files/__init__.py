"""File containers: how weights and their configuration are laid out on disk.

A container (llama2.c's v0/v1/v2 `.bin`; GGUF later) is not a weight format: a container says
which tensors a file holds, in what order, with what header; each tensor's bytes are encoded by
a weight format from `llama2nb.formats`. Each container module has one `layout()` that both its
reader and its writer walk.
"""
