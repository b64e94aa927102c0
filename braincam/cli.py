"""`braincam COMMAND ...` (also `python -m braincam`): the command-line entry point.

Commands live in a registry: each names the module that implements it, imported
only when that command runs, so `braincam predict` loads neither the web stack
nor TensorFlow. A module either defines `add_arguments(parser)` and `run(args)`
(its options join this parser), or, registered with `own_parser=True`, a
`main(argv) -> int` that parses its own arguments. Adding a command is one entry.

Packages above the core add commands through the `braincam.commands` entry point
group (name = command, value = module, which also defines `HELP`): `braincam serve`
comes from the service that way (service/command.py), so the core never imports it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from braincam import DISCLAIMER, __version__


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    module: str
    own_parser: bool = False  # the module's main(argv) parses the rest of the line


COMMANDS: tuple[Command, ...] = (
    Command(
        "predict",
        "classify every image and volume under the given paths (CSV/JSONL, optional overlays)",
        "braincam.commands.predict",
    ),
    Command(
        "info",
        "describe a model directory: labels, input, explained layer, parity, providers",
        "braincam.commands.info",
    ),
    Command(
        "audit",
        "score the model's explanations on your images: faithfulness, randomisation, "
        "heat outside the head, stability",
        "braincam.audit.command",
    ),
    Command(
        "dicomweb",
        "analyse a study on a DICOMweb PACS and store SR + Secondary Capture back",
        "braincam.dicomweb_cli",
        own_parser=True,
    ),
)


PLUGIN_GROUP = "braincam.commands"


def commands(with_help: bool = True) -> tuple[Command, ...]:
    """The core's commands, then those installed packages register (entry points).

    A plugin's module is imported for its `HELP` only when `with_help` (the command
    list is shown): running `braincam predict` must not import the web stack."""
    from importlib.metadata import entry_points

    names = {c.name for c in COMMANDS}
    plugins = []
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        if ep.name in names:
            continue  # a core command keeps its name
        names.add(ep.name)
        help_text = ""
        if with_help:
            try:
                help_text = getattr(importlib.import_module(ep.value), "HELP", "")
            except ImportError as exc:  # a plugin whose dependencies are missing
                help_text = f"(unavailable: {exc})"
        plugins.append(Command(ep.name, help_text, ep.value))
    return (*COMMANDS, *plugins)


class UsageError(Exception):
    """A mistake on the command line (or a model directory that cannot be used): exit 2."""


def _parser(
    selected: Command | None, available: Sequence[Command]
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="braincam",
        description="Explainable brain-MRI tumour classification on ONNX Runtime. "
        + DISCLAIMER,
    )
    parser.add_argument("--version", action="version", version=f"braincam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in available:
        if selected is not None and command.name == selected.name:
            # only the command that runs imports its module
            module = importlib.import_module(command.module)
            text = getattr(module, "HELP", command.help)
            module.add_arguments(sub.add_parser(command.name, help=text, description=text))
        else:
            sub.add_parser(command.name, help=command.help, description=command.help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    selected = next((c for c in commands(with_help=False) if args and args[0] == c.name), None)
    available = commands(with_help=selected is None)  # help texts: the list is shown
    if selected is not None and selected.own_parser:
        return int(importlib.import_module(selected.module).main(args[1:]))
    parser = _parser(selected, available)
    parsed = parser.parse_args(args)
    module = importlib.import_module(next(c for c in available if c.name == parsed.command).module)
    try:
        return int(module.run(parsed))
    except UsageError as exc:
        print(f"braincam {parsed.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `braincam predict DIR | head`: the reader left
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
        return 1
