"""Run folders: a folder of generated images that knows what it holds.

``run.json`` (the manifest) is written before the first image: the kind of run, the model and its
checksum, every setting that determines the images, the index range and the versions. Samples are
``{index:05d}.png`` and are written atomically (a temporary name, then a rename), so a file that is
present is complete. A run refuses a folder that holds another run (or images it did not write)
unless told to overwrite it; a run restarted with the same settings and ``resume=True`` skips the
images that are present and readable at the right size. ``fid`` reads exactly the samples a
manifest lists, never the grid or process pictures beside them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from typing import Optional

from .image_folder import ARTEFACTS, IMAGE_EXTENSIONS
from .models.checks import InputError

MANIFEST = "run.json"
SAMPLE_PATTERN = "{:05d}.png"
_SAMPLE_RE = re.compile(r"^\d{5,}\.png$")
_TMP_PREFIX = ".tmp-"  # temporary names of atomic writes (a killed run may leave some)

_sha_cache: dict = {}


def file_sha256(path: str) -> str:
    """SHA-256 of a file (cached per path, size and mtime within the process)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def check_output_dir(out: str, flag: str = "--out") -> None:
    """Before any work: ``out`` must be a folder (existing or creatable) that can be written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"{flag} {out} is a file; expected a folder for the outputs")
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise InputError(f"{flag} {out}: {probe} is a file, so the folder cannot be created")
    try:  # a real write: os.access says yes to root even on read-only mounts
        fd, tmp = tempfile.mkstemp(prefix=".mage_fast-write-check-", dir=probe)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise InputError(f"{flag} {out} is not writable ({probe}: {e.strerror or e})") from e


def check_output_file(out: str, flag: str = "--out") -> None:
    """Before any work: ``out`` names a file (not a folder) in a folder that exists or can be made,
    and can be written."""
    if os.path.isdir(out):
        raise InputError(f"{flag} {out} is a directory; expected a file path")
    parent = os.path.dirname(os.path.abspath(out))
    probe = parent
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise InputError(f"{flag} {out}: {probe} is a file, so {out} cannot be written")
    check_output_dir(parent, flag)


def sample_name(index: int) -> str:
    return SAMPLE_PATTERN.format(index)


def read_manifest(folder: str) -> Optional[dict]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not a readable run manifest ({e}); remove it or choose another folder") from e
    if not isinstance(m, dict) or "kind" not in m or "num_images" not in m:
        raise InputError(f"{path} is not a mage_fast run manifest; choose another folder")
    for key, ok, want in (("kind", lambda v: isinstance(v, str), "a string"),
                          ("num_images", _count, "an integer >= 0"),
                          ("first_index", _count, "an integer >= 0"),
                          ("status", lambda v: isinstance(v, str), "a string"),
                          ("settings", lambda v: isinstance(v, dict), "an object"),
                          ("image_size", lambda v: _count(v) and v > 0, "an integer > 0")):
        if key in m and not ok(m[key]) and not (key in ("image_size", "settings", "status") and m[key] is None):
            raise InputError(f"{path} is not a readable run manifest ({key}: expected {want}, got "
                             f"{json.dumps(m[key])[:40]}); remove it or choose another folder")
    return m


def _count(v) -> bool:
    return type(v) is int and v >= 0


def _present_samples(folder: str, first: int, n: int) -> set[int]:
    """Indices in [first, first + n) with a sample file in ``folder`` (listed once: a manifest's
    count is never looped over, so a wrong one cannot stall a reader)."""
    found = set()
    for f in os.listdir(folder):
        if _SAMPLE_RE.match(f):
            i = int(f[:-4])
            if first <= i < first + n and f == sample_name(i):
                found.add(i)
    return found


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else by setting
    and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary name beside ``path``; renamed to ``path`` when the block succeeds, removed
    when it fails, so ``path`` is never half a file. The file gets the mode ``open()`` would give it
    (0666 less the umask), not the temporary file's private 0600."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=os.path.splitext(path)[1], dir=d)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj, **kw) -> None:
    """``obj`` as JSON at ``path``, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, **kw)


def write_manifest(folder: str, manifest: dict) -> None:
    write_json(os.path.join(folder, MANIFEST), manifest, sort_keys=True)


def _foreign_images(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and f not in ARTEFACTS
                  and not _SAMPLE_RE.match(f) and not f.startswith(_TMP_PREFIX))



def _identity(m: dict) -> dict:
    """What determines the images: everything but bookkeeping."""
    return {k: m.get(k) for k in ("kind", "model_sha256", "settings", "first_index", "num_images")}


def image_ok(path: str, size: int) -> bool:
    """A finished sample: present, decodable, RGB at the model's size."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return im.size == (size, size) and im.mode == "RGB"
    except Exception:
        return False


def check_run_folder(out: str, manifest: dict, *, overwrite: bool = False, resume: bool = False):
    """What :func:`prepare_run` refuses, checked without writing anything (the folder need not
    exist): raises :class:`InputError` for a folder that holds another run or images this project did
    not write. Returns (the old manifest or None, the sample files present). A caller with more
    checks to make before writing (a reference set to read) runs this first."""
    if overwrite and resume:
        raise InputError("--overwrite and --resume exclude each other")
    check_output_dir(out)
    if not os.path.isdir(out):
        return None, []
    old = read_manifest(out)
    foreign = _foreign_images(out)
    samples = sorted(f for f in os.listdir(out) if _SAMPLE_RE.match(f))
    if foreign:
        raise InputError(f"{out} holds {len(foreign)} image(s) not written by a mage_fast run (e.g. {foreign[0]}); "
                         f"choose an empty or new --out folder")
    if old is None and samples and not overwrite:
        raise InputError(f"{out} holds {len(samples)} sample file(s) but no {MANIFEST}: they cannot be told apart "
                         f"from this run's; pass --overwrite to replace them or choose another --out")
    if old is not None and not overwrite:
        if _identity(old) != _identity(manifest):
            a, b = _identity(old), _identity(manifest)
            diff = [k for k in a if k != "settings" and a[k] != b[k]]
            sa, sb = a.get("settings") or {}, b.get("settings") or {}
            diff += [f"settings.{k}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
            raise InputError(f"{out} holds another run ({old.get('kind')}, {old.get('num_images')} images; differs in "
                             f"{', '.join(diff)}); pass --overwrite to replace it or choose another --out")
        if not resume:
            raise InputError(f"{out} already holds this run ({old.get('status', 'unknown')}, "
                             f"{len(samples)} of {old['num_images']} images); pass --resume to finish it or "
                             f"--overwrite to start again")
    return old, samples


def prepare_run(out: str, manifest: dict, *, overwrite: bool = False, resume: bool = False,
                image_size: Optional[int] = None) -> set[int]:
    """Make ``out`` ready for the run ``manifest`` describes, and write the manifest (status
    "running"). Returns the indices already finished (``resume``); raises :class:`InputError` for
    a folder that holds another run or images this project did not write (:func:`check_run_folder`)."""
    old, samples = check_run_folder(out, manifest, overwrite=overwrite, resume=resume)
    os.makedirs(out, exist_ok=True)
    done: set[int] = set()
    if old is not None and not overwrite:
        first, n = manifest["first_index"], manifest["num_images"]
        for i in sorted(_present_samples(out, first, n)):
            p = os.path.join(out, sample_name(i))
            if os.path.isfile(p) and (image_size is None or image_ok(p, image_size)):
                done.add(i)
    if overwrite:
        for f in samples + [a for a in ARTEFACTS if os.path.isfile(os.path.join(out, a))]:
            os.remove(os.path.join(out, f))
    for f in os.listdir(out):  # half-written files of a killed run (ours: written, then renamed)
        if f.startswith(_TMP_PREFIX):
            os.remove(os.path.join(out, f))
    write_manifest(out, dict(manifest, status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
    return done


def finish_run(out: str, **extra) -> None:
    m = read_manifest(out) or {}
    m.update(extra, status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_manifest(out, m)


def save_atomic_png(arr, path: str) -> None:
    """(H, W, 3) uint8 -> PNG, written under a temporary name and renamed (never half a file)."""
    from PIL import Image
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def run_samples(folder: str) -> Optional[list[str]]:
    """The sample files a run folder's manifest lists (all present), or None without a manifest."""
    m = read_manifest(folder)
    if m is None:
        return None
    first, n = m.get("first_index", 0), m["num_images"]
    present = _present_samples(folder, first, n)
    if m.get("status") != "complete" or len(present) < n:
        raise InputError(f"{folder} holds an unfinished run ({len(present)} of {n} images); finish it with "
                         f"the same command and --resume")
    return [os.path.join(folder, sample_name(i)) for i in range(first, first + n)]
