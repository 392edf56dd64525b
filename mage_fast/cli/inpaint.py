"""``inpaint``: regenerate a box or a mask of an image (:func:`mage_fast.editing.inpaint`)."""
from . import _editing

NAME = "inpaint"
ORDER = 20
HELP = "regenerate a box or mask of an image"


def add_arguments(p) -> None:
    _editing.add_arguments(p, NAME)


def run(args) -> int:
    return _editing.run(args, NAME)
