"""`braincam COMMAND ...` (also `python -m braincam`): the command-line entry point.

Commands live in a registry: each names the module that implements it, imported
only when that command runs, so `braincam predict` loads neither the web stack
nor TensorFlow. A module either defines `add_arguments(parser)` and `run(args)`
(its options join this parser), or, registered with `own_parser=True`, a
`main(argv) -> int` that parses its own arguments. Adding a command is one entry.
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
        "serve",
        "serve the HTTP API and web page (the same BRAINCAM_* settings as python -m service)",
        "braincam.commands.serve",
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


class UsageError(Exception):
    """A mistake on the command line (or a model directory that cannot be used): exit 2."""


def _parser(selected: Command | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="braincam",
        description="Explainable brain-MRI tumour classification on ONNX Runtime. "
        + DISCLAIMER,
    )
    parser.add_argument("--version", action="version", version=f"braincam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        if command is selected:  # only the command that runs imports its module
            importlib.import_module(command.module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    selected = next((c for c in COMMANDS if args and args[0] == c.name), None)
    if selected is not None and selected.own_parser:
        return int(importlib.import_module(selected.module).main(args[1:]))
    parser = _parser(selected)
    parsed = parser.parse_args(args)
    module = importlib.import_module(next(c for c in COMMANDS if c.name == parsed.command).module)
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
