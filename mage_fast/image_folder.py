"""Image folders: the one reader with which training, evaluation and ``fid`` find their images.

The rules, the same for every caller:

- An image is a file whose name ends with one of :data:`IMAGE_EXTENSIONS` (any case). Hidden files
  and folders (a leading dot: macOS ``._*`` copies, a killed run's ``.tmp-*`` files) are skipped.
- The class layout ``root/<class>/...``: every sub-folder of ``root`` is a class, sorted by name
  (the class index is the position); its images are found at any depth below it, the files of a
  folder (sorted) before those of its sub-folders (in sorted path order). This order is fixed:
  training indexes its samples, and resumes, by it.
- ``flat=True`` (the ``fid`` sets, which need no labels) also takes a folder of images without
  classes: the images at the top level of ``root``, except the pictures a run writes beside its
  samples (:data:`ARTEFACTS`). A folder with none there is read in the class layout; one with
  images both there and in class sub-folders is refused as ambiguous. So wherever two callers
  accept a folder, they list the same files.

:func:`open_image` decodes one of them; a file that cannot be decoded is an
:class:`ImageReadError` naming it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from PIL import Image

from .models.checks import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")

# The pictures a run folder holds beside its samples (mage_fast.runs writes them): never images of a set.
ARTEFACTS = ("grid.png", "process.png", "before_after.png")

# What PIL raises for a file it cannot decode: truncated, unidentified or malformed files, and headers
# that declare a size past its decompression-bomb limit (a flipped byte can).
IMAGE_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageReadError(InputError):
    """An image of a folder that cannot be decoded, named. Keeps its one-line message through a
    DataLoader worker, whose re-raise passes the worker's whole traceback as the message."""

    def __init__(self, msg: str):
        if "\nOriginal Traceback" in msg:  # "...\nmage_fast.image_folder.ImageReadError: <msg>"
            msg = msg.rstrip().splitlines()[-1].split("ImageReadError: ", 1)[-1]
        super().__init__(msg)


def is_image_name(name: str) -> bool:
    """Whether a file called ``name`` is an image of a folder (extension, not hidden)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


class ImageFolderNotFound(InputError, FileNotFoundError):
    """An image folder that is not there (or is a file): an :class:`InputError` (one line under the
    scripts) and, as before, a ``FileNotFoundError``."""


def class_folders(root: str) -> list[str]:
    """The class names of ``root``: its sub-folders that are not hidden, sorted;
    :class:`ImageFolderNotFound` when ``root`` is not a folder."""
    if not os.path.isdir(root):
        raise ImageFolderNotFound(f"{root} is a file, not an image folder" if os.path.exists(root)
                                  else f"image folder not found: {root}")
    return sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))


def _walk(folder: str) -> Iterator[tuple[str, list[str]]]:
    """(folder path, file names) below ``folder``, hidden folders not entered, in walk order."""
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield dirpath, files


def class_images(folder: str) -> list[str]:
    """The images at any depth below ``folder``, in the reader's order."""
    return [os.path.join(dirpath, f) for dirpath, files in sorted(_walk(folder)) for f in sorted(files)
            if is_image_name(f)]


def has_images(folder: str) -> bool:
    """Whether :func:`class_images` would find any, stopping at the first folder that holds one."""
    return any(any(map(is_image_name, files)) for _, files in _walk(folder))


def list_image_folder(root: str, *, flat: bool = False) -> tuple[list[tuple[str, int]], list[str]]:
    """The images of a folder by the rules above: ``([(path, class index)], class names)``.

    Args:
        root: the folder.
        flat: also take a folder of images without classes: the images at the top level of
            ``root`` (label 0 each, no class names). By default only the class layout
            ``root/<class>/...`` is read (top-level files are not images of it).

    Raises ``FileNotFoundError`` when ``root`` is not a folder, and
    :class:`~mage_fast.models.checks.InputError` (one line) when it has no class sub-folders or no
    images, or (``flat``) images both at its top level and in sub-folders.

    Example:
        >>> items, classes = list_image_folder("data/train")  # doctest: +SKIP
        >>> items[0]  # doctest: +SKIP
        ('data/train/cat/0001.png', 0)
    """
    classes = class_folders(root)
    if flat:
        top = sorted(f for f in os.listdir(root) if is_image_name(f) and f not in ARTEFACTS
                     and os.path.isfile(os.path.join(root, f)))
        if top:
            mixed = [c for c in classes if has_images(os.path.join(root, c))]
            if mixed:
                raise InputError(f"{root} holds images both at its top level and in sub-folders ({', '.join(mixed[:3])}"
                                 f"{', ...' if len(mixed) > 3 else ''}); expected a folder of images or the "
                                 f"ImageFolder layout root/<class>/<image>, not both")
            return [(os.path.join(root, f), 0) for f in top], []
    exts = ", ".join(IMAGE_EXTENSIONS)
    if not classes:
        if flat:
            raise InputError(f"no images in {root} (files ending {exts}, at its top level or in class sub-folders)")
        raise InputError(f"{root} has no class sub-folders; expected the ImageFolder layout root/<class>/<image>")
    items = [(path, i) for i, c in enumerate(classes) for path in class_images(os.path.join(root, c))]
    if not items:
        raise InputError(f"{root} holds no images (files ending {exts}) in its class sub-folders"
                         + ("; no images in it at its top level either" if flat else ""))
    return items, classes


def list_images(root: str) -> list[str]:
    """The image paths of a set of images (``fid``): :func:`list_image_folder` with ``flat=True``."""
    return [path for path, _ in list_image_folder(root, flat=True)[0]]


@contextlib.contextmanager
def open_image(path: str) -> Iterator[Image.Image]:
    """The PIL image in ``path``, decoded, for the duration of a ``with`` block; a file that cannot
    be decoded raises :class:`ImageReadError` naming it (one line)."""
    try:
        im = Image.open(path)
        try:
            im.load()
        except BaseException:
            im.close()
            raise
    except IMAGE_READ_ERRORS as e:
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e}); remove or replace it") from e
    with im:
        yield im
