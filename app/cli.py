"""The ``vl-interpret`` console command that ``pip install`` puts on the PATH.

    vl-interpret -d DB [-p PORT] [--host HOST] [-m NAME PARAM ...]   # the app, as python run_app.py ...
    vl-interpret extract -m NAME PARAM ... --pairs FILE --out DB     # as python -m app.database.extract ...
    vl-interpret upgrade DB [DB ...]                                 # as python -m app.database.upgrade ...
    vl-interpret merge DB [DB ...] --into DB [--renumber]            # as python -m app.database.merge ...
    vl-interpret token-map DB [--layers ...] [--max-tokens N]       # as python -m app.database.token_map ...

Each form hands its arguments, unchanged, to the ``main(argv)`` of the module it names, so the command
and the scripts of a checkout never drift apart. The bundled databases are not in the package: a
relative ``-d`` that does not exist gets a hint saying where they are.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from typing import Optional, Sequence

PROG = "vl-interpret"
SUBCOMMANDS = {  # name: (module whose main(argv) runs it, what it does)
    "extract": ("app.database.extract", "run a live model over a JSON-lines file of (image, text) pairs "
                                        "into a database"),
    "upgrade": ("app.database.upgrade", "upgrade a database written by an older VL-InterpreT, in place"),
    "merge": ("app.database.merge", "merge databases (the shards of a torchrun extraction) into one"),
    "token-map": ("app.database.token_map", "fit the database-wide token maps ahead of time"),
}
BUNDLED_DATABASES = ("example_database1", "example_database2")


def subcommands_help() -> str:
    lines = [f"other commands (`{PROG} COMMAND --help` for their options):"]
    lines += [f"  {PROG} {name:<9} {what}" for name, (_module, what) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def checkout_root() -> Optional[str]:
    """The repository folder around the imported ``app`` package when it is a checkout (run from one,
    or installed with ``pip install -e``), else None (a wheel installed in site-packages)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.isfile(os.path.join(root, "run_app.py")) else None


def missing_database_hint(path: str) -> Optional[str]:
    """The error for a relative database path that does not exist, saying where the bundled
    databases are (a user of the installed command often types the README's ``-d example_database2``
    outside a checkout); None when the path exists or is absolute (the app reports those itself)."""
    if os.path.isabs(os.path.expanduser(path)) or os.path.exists(path):
        return None
    message = f"no database folder {path!r} in the current folder {os.getcwd()}"
    root = checkout_root()
    if root is not None and os.path.isdir(os.path.join(root, path)):
        return f"{message}: did you mean {os.path.join(root, path)}?"
    return (f"{message}. The bundled example databases ({', '.join(BUNDLED_DATABASES)}) are not part of "
            f"the installed package: they are in a checkout of the VL-InterpreT repository, so pass "
            f"their path, e.g. {PROG} -d /path/to/VL-InterpreT/example_database2")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        # Imported only when named: extraction and upgrades need neither Dash nor each other.
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        return module.main(argv[1:], prog=f"{PROG} {argv[0]}")
    from app import server  # noqa: PLC0415 - after the subcommands, which do not need Dash

    parser = server.build_parser()
    parser.prog = PROG
    parser.description = textwrap.fill(parser.description, 100)  # the raw formatter below keeps lines as given
    parser.epilog = subcommands_help()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    args = parser.parse_args(argv)  # --help and usage errors under this command's name
    hint = missing_database_hint(args.database)
    if hint is not None:
        print(f"error: {hint}", file=sys.stderr)
        return 2
    return server.main(argv)


if __name__ == "__main__":
    sys.exit(main())
