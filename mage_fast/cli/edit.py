"""``edit``: inpaint with a new class for the region, on a class-conditional model."""
from . import _editing
from .common import CLIError

NAME = "edit"
ORDER = 30
HELP = "inpaint with a new class for the region (class-conditional)"


def add_arguments(p) -> None:
    _editing.add_arguments(p, NAME)


def run(args) -> int:
    if args.class_id is None:
        raise CLIError("edit needs --class-id (the class to paint into the region)")
    return _editing.run(args, NAME)
