"""The ``qlora`` sub-commands, one module each.

A command module has ``HELP`` (one line), ``add_arguments(parser)`` and ``main(args) -> int``, and imports
nothing heavy at module level so that ``qlora --help`` stays fast.
"""

#: Module names under ``qlora_core.cli.commands``, in the order ``qlora --help`` lists them; the command is the
#: module's name with ``-`` for ``_`` (``new_plugin``: ``qlora new-plugin``).
COMMANDS = ("run", "prepare", "eval", "generate", "merge", "plan", "bench", "plugins", "new_plugin")
