"""Write a conversion into a temporary sibling directory and move it into place only when it succeeded."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Iterator

from aapo_megatron.checkpoint.errors import ConversionError


class OutputExistsError(ConversionError):
    """The output directory exists and --force was not given."""


def check_output_dir(out: str, force: bool, inputs: tuple[str, ...] = ()) -> str:
    """Absolute path of `out` after refusing an existing one without force, or one that is an input."""
    out = os.path.abspath(out)
    for src in inputs:
        src = os.path.abspath(src)
        if out == src or src.startswith(out + os.sep):
            raise ConversionError(f"output directory {out} would overwrite the input {src}")
    if os.path.lexists(out):
        if not force:
            raise OutputExistsError(f"output directory {out} already exists; pass --force to overwrite it")
        if not os.path.isdir(out) or os.path.islink(out):
            raise ConversionError(f"output path {out} exists and is not a directory; remove it yourself")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise ConversionError(f"parent directory {parent} of the output does not exist")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str, force: bool, inputs: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield a fresh temporary sibling of `out`; on success it replaces `out`, on any error it is deleted."""
    out = check_output_dir(out, force, inputs)
    tag = uuid.uuid4().hex[:8]
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{tag}")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(out):  # --force: swap, then delete the old one
        old = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.old-{tag}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
