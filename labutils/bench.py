"""The command line of the experiments: ``python -m labutils.bench <subcommand> [--out ...]``.

Only the dispatch lives here; each subcommand is an experiment module with an
``add_arguments(parser)`` and a ``run_command(args) -> dict`` that prints its table and returns a
JSON-friendly result. All of them stand on ``labutils.runs`` (provenance, atomic files, the
``--set`` parser, ``UsageError``); the layers, bottom up::

    runs                      provenance, write_json / save_safetensors, --set, UsageError
    packing_bench             packing        pack / unpack throughput of labutils.packing
    kernel_bench              kernels        labutils.kernels vs float32 and int8 matmuls
    benchmark (a package)     imdb           the IMDb benchmark: train, cpu, report (chapter 7)
    lm.experiment             lm             chapter 8's language models
    peers                     peers          the packed decoder next to llama.cpp (chapter 8.6)
    bench                     this command line

An experiment module is imported only when its subcommand runs (``imdb`` brings torch and the
Hugging Face stack). ``--out`` (common to all) is a JSON file, or the folder an experiment fills.
Timings are absolute, on whatever the machine is doing at the time; tests never assert on them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labutils.runs import UsageError, parse_set_options, positive_int

__all__ = ["COMMANDS", "Command", "UsageError", "main", "parse_set_options", "positive_int"]


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, the experiment module that runs it, and whether ``--out``
    names a folder the experiment fills itself (else a JSON file this command line writes)."""

    help: str
    module: str
    out_is_dir: bool = False

    def experiment(self) -> Any:
        """The experiment module, imported now (so ``bench --help`` imports none of them)."""
        return importlib.import_module(self.module)


COMMANDS: dict[str, Command] = {
    "packing": Command("pack/unpack throughput of labutils.packing", "labutils.packing_bench"),
    "kernels": Command("labutils.kernels on every CPU path vs torch float32 and int8 matmuls", "labutils.kernel_bench"),
    "imdb": Command("the IMDb benchmark: train, measure on the CPU, report (labutils.benchmark)", "labutils.benchmark",
                    out_is_dir=True),
    "lm": Command("chapter 8's language models: tokenizer, train, LoRA, attention vs length, decode "
                  "(labutils.lm.experiment)", "labutils.lm.experiment", out_is_dir=True),
    # needs llama-cpp-python to run (pip install 'labutils[peers]')
    "peers": Command("the book's packed W1.58A8 path next to llama.cpp (GGUF TQ2_0/TQ1_0/Q8_0/F16; labutils.peers)",
                     "labutils.peers", out_is_dir=True),
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand, write ``--out``; exit status 1 if ``--strict`` and a
    target is missed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m labutils.bench", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    subs = {}
    chosen = next((a for a in argv if a in COMMANDS), None)  # only its experiment module is imported
    for name, command in COMMANDS.items():
        sub = subs[name] = subparsers.add_parser(name, help=command.help)
        if name != chosen:
            continue
        command.experiment().add_arguments(sub)
        sub.add_argument("--out", type=Path, help="the output folder" if command.out_is_dir else "write the results as JSON here")
        sub.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    try:
        result = COMMANDS[args.command].experiment().run_command(args)
    except UsageError as exc:
        subs[args.command].error(str(exc))  # exits with status 2
    result = {
        "command": args.command,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        **result,
    }
    if args.out is not None and not COMMANDS[args.command].out_is_dir:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 1 if args.strict and result.get("pass") is False else 0


if __name__ == "__main__":
    sys.exit(main())
