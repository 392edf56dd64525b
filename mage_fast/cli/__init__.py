"""The command line, ``python -m mage_fast`` (console script ``mage-fast``).

One module per command (``generate``, ``inpaint``, ``edit``, ``outpaint``, ``evaluate`` (the
``eval`` command), ``fid``, ``info``), each with ``NAME``, ``HELP``, ``ORDER``, ``add_arguments``
and ``run``; :mod:`.common` holds the shared argument groups and helpers, finds the command
modules (:func:`.common.command_modules`) and builds the parser. A new command is one new module
here; modules whose names start with ``_`` (``_editing``, what the three editing commands share)
are not commands.
"""
from .common import (CLIError, DEFAULT_CKPT, build_parser, class_names, command_modules, load_model, main, model_card,
                     resolve_class, sampling_defaults, token_filter_settings)

__all__ = ["CLIError", "DEFAULT_CKPT", "build_parser", "class_names", "command_modules", "load_model", "main",
           "model_card", "resolve_class", "sampling_defaults", "token_filter_settings"]
