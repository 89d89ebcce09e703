"""`--help` of the training commands: every default is the one the code applies (TrainConfig, or
the preset named before --help), in Click's one `[default: ...]` style."""

from __future__ import annotations

import re
from dataclasses import asdict

import click
import pytest
from click.testing import CliRunner

from llama2nb.cli import main
from llama2nb.training.commands import _TRAIN_OPTIONS, TRAINING_COMMANDS
from llama2nb.training.settings import PRESETS, TrainConfig, config_from


def help_entries(args: list[str]) -> dict[str, str]:
    """{flag: the description of its option, on one line} from `llama2nb ARGS --help`, printed
    unwrapped: the flags are the first column, the description follows two spaces or a newline."""
    r = CliRunner().invoke(main, [*args, "--help"], terminal_width=1000)
    assert r.exit_code == 0, r.output
    options = r.output.split("\nOptions:\n", 1)[1]
    entries = {}
    for entry in re.split(r"\n(?=  -)", options.strip("\n")):
        column, _, description = re.split(r"( {2,}|\n)", entry.strip(), maxsplit=1)
        for flag in re.findall(r"--?[A-Za-z][\w-]*", column):
            entries[flag] = " ".join(description.split())
    return entries


def shown_default(entry: str) -> str | None:
    m = re.search(r"\[default: ([^\]]*?)(?:; [^\]]*)?\]$", entry)
    return m.group(1) if m else None


def expected_display(flags: str, value) -> str:
    """How Click shows `value` as the default of an option declared as `flags`."""
    if isinstance(value, bool):
        on, off = flags.split("/")
        return (on if value else off).lstrip("-")
    return str(value)


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_train_help_shows_the_effective_defaults(preset):
    entries = help_entries(["train"] + (["--preset", preset] if preset else []))
    config = asdict(config_from(preset, {}))
    for flags, field, _, _ in _TRAIN_OPTIONS:
        first = flags.split("/")[0]
        assert shown_default(entries[first]) == expected_display(flags, config[field]), entries[first]


def test_train_without_preset_is_the_15M_run():
    """The help says so: TrainConfig's defaults are llama2.c's stories15M run."""
    assert TrainConfig() == config_from("15M", {})
    assert "Without one, the defaults shown: llama2.c's 15M run" in help_entries(["train"])["--preset"]


def test_preset_defaults_are_overridden_by_flags(tmp_path, monkeypatch):
    """Defaults from --preset (Click's default_map) do not count as given: the config is the
    preset's, with only the typed flags on top."""
    import llama2nb.training.train as train_module

    seen = []

    def fake_train(cfg, **kwargs):
        seen.append(cfg)
        return {"iter_num": 0, "best_val_loss": 0.0}

    monkeypatch.setattr(train_module, "train", fake_train)
    r = CliRunner().invoke(main, ["train", "--preset", "260k", "--dim", "96", "--eval-only", "--quiet",
                                  "--out-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert seen == [config_from("260K", {"dim": 96, "eval_only": True, "out_dir": str(tmp_path)})]


def commands_and_args():
    for command in TRAINING_COMMANDS:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield sub, [command.name, name]
        else:
            yield command, [command.name]


def declared_default(param: click.Option):
    """The option's default value, None when it has none (Click marks that with a sentinel)."""
    return None if param.default is None or type(param.default).__name__ == "Sentinel" else param.default


@pytest.mark.parametrize("command,args", list(commands_and_args()), ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_one_default_style_and_every_flag_explained(command, args):
    entries = help_entries(args)
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        entry = entries[param.opts[0]]
        assert param.help, f"{args} {param.opts[0]}: no help text"
        if declared_default(param) is not None and not (param.is_flag and not param.secondary_opts):
            assert shown_default(entry) is not None, entry
        for note in re.findall(r"\[([^\]]*)\]", entry):  # only Click's: [default: ...; RANGE; required]
            parts = note.removeprefix("default: ").split("; ")[1:] if note.startswith("default: ") else note.split("; ")
            for part in parts:
                assert part == "required" or re.fullmatch(r"(?:[\d.]+<=?)?x(?:[<>]=?[\d.]+)?", part), entry
