"""The ``qlora`` command line: a thin layer over the Python API (:class:`qlora_core.Job`) and :mod:`qlora_core.framework.plugins`.

User errors print one ``error:`` line on stderr and exit with code 2; so does a plugin that raises in one of its
hooks (the line names the plugin, the hook and the plugin's line that raised). Anything else is a bug of
qlora's and ends with its traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Sequence

from qlora_core.framework.plugins import TRACE_ENV, __version__, hook_failure
from qlora_core.cli.commands import COMMANDS
from qlora_core.framework.errors import PluginError, UsageError
from qlora_core.framework.noise import quiet_third_party_noise

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: same one-line form, same code
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qlora", description="QLoRA fine-tuning through plugins.")
    parser.add_argument("--version", action="version", version=f"qlora {__version__}")
    _add_trace_option(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"qlora_core.cli.commands.{name}")
        command = sub.add_parser(name.replace("_", "-"), help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        _add_trace_option(command)
        command.set_defaults(handler=module.main)
    add_plugin_commands(sub)
    return parser


def _add_trace_option(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    """``--trace-plugins``, before or after the command's name."""
    parser.add_argument("--trace-plugins", action="store_true", default=default,
                        help=f"log every hook call with its plugin and duration to stderr (or set {TRACE_ENV}=1)")


def add_plugin_commands(sub) -> None:
    """The sub-commands installed plugins add (:func:`~qlora_core.hookspecs.qlora_register_commands`)."""
    from qlora_core.framework.plugins import installed_plugin_manager

    pm = installed_plugin_manager()
    taken = set(sub.choices)

    def register(name: str, help: str, add_arguments, main) -> None:
        if name in taken:
            raise PluginError(f"a plugin registers the command {name!r}, which exists already; rename it")
        taken.add(name)
        command = sub.add_parser(name, help=help, description=help)
        add_arguments(command)
        command.set_defaults(handler=main)

    pm.hook.qlora_register_commands(register=register)


def _quiet_hub_retries() -> None:
    """huggingface_hub logs each retry of a request it cannot make (``'[Errno -2] Name or service not known'
    thrown while requesting HEAD ...``, ``Retrying in 1s [Retry 1/5].``): six lines before an offline hub id's
    one ``error:`` line, which says it could not connect."""
    import logging

    logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)


def _say(line: str) -> None:
    """Print ``line`` on stderr; a worker of ``qlora run --nproc-per-node`` leaves it to the launcher, which
    prints each distinct line once (:mod:`qlora_core.cli.launch`)."""
    from qlora_core.cli.launch import report

    if not report(line):
        print(line, file=sys.stderr)


def _error(message: object) -> int:
    text = " ".join(str(message).split("\n")).strip()  # one line, whatever the message holds
    _say(f"error: {text}")
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except PluginError as e:
        return _error(e)
    except Exception as e:  # a plugin's qlora_register_commands
        failure = hook_failure(e)
        if failure is None:
            raise
        return _error(failure.message(e))
    args = parser.parse_args(argv)
    if args.trace_plugins:
        os.environ[TRACE_ENV] = "1"  # read where each run's plugins are registered
    if args.command not in ("plugins", "new-plugin"):  # these two import none of the libraries it quiets
        quiet_third_party_noise()
        _quiet_hub_retries()
    try:
        return args.handler(args)
    except UsageError as e:
        return _error(e)
    except KeyboardInterrupt as e:
        from qlora_core.loop.interrupt import Interrupted

        if isinstance(e, Interrupted):  # a stop signal: the run checkpointed and says how to continue
            _say(e.message())
            return e.exit_code
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qlora plugins --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        failure = hook_failure(e)
        if failure is None:
            raise
        return _error(failure.message(e))


def entry() -> None:
    sys.exit(main())
