"""``outpaint``: regenerate everything outside --keep-box (:func:`mage_fast.editing.outpaint`)."""
from . import _editing

NAME = "outpaint"
ORDER = 40
HELP = "regenerate everything outside --keep-box"


def add_arguments(p) -> None:
    _editing.add_arguments(p, NAME)


def run(args) -> int:
    return _editing.run(args, NAME)
