"""The errors a user can cause, as opposed to the errors a programmer can.

Every expected failure (a bad file, a bad flag value, a prompt that does not fit, an unreachable
hub) raises a subclass of `Llama2nbError` whose message is one line naming the file or field,
what was expected and what was found. The command line prints exactly those (and OSErrors about
the user's own files) as `Error: ...` and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class Llama2nbError(Exception):
    """An expected user error; str(e) is the one line to show."""


class CheckpointError(Llama2nbError, ValueError):
    """A model file (checkpoint, export source) that cannot be used."""


class TokenizerError(Llama2nbError, ValueError):
    """A tokenizer file that cannot be used."""


class UsageError(Llama2nbError, ValueError):
    """A setting outside its range (a flag's value, or an argument of the Python API)."""


class DataError(Llama2nbError, ValueError):
    """Training data that cannot be used: a text file, TinyStories shards, pretokenized shards."""


class TrainingError(Llama2nbError, ValueError):
    """Training settings or a run's state (ckpt.pt for --resume) that cannot be used."""


class HubError(Llama2nbError):
    """A file the Hugging Face hub could not give: the hub unreachable, or the file not there."""
