"""Paths inside a mounted backup: what a client may ask for, and how it resolves.

A request path is a POSIX path below the mount root. It is refused (400 ``PATH_TRAVERSAL``)
when it holds a NUL byte, a backslash (a Windows separator some clients and tools take for
``/``; file names with a backslash are therefore not reachable) or a ``..`` segment: a client
never needs ``..`` to name something below the root, so there is nothing to normalise, only to
refuse. Empty and ``.`` segments are dropped.

Symbolic links are resolved inside their file system, component by component, by this module
rather than by dissect: a relative target is read against the link's directory and may use
``..`` as long as it never climbs above the file system's root (checked lexically on the target,
then again while resolving, since links on the way move the walk); an absolute target is refused,
because the file system's mount point in the guest is unknown (``/etc/passwd`` in a ``/boot``
partition does not name a file of that partition). At most :data:`MAX_SYMLINKS` links are
followed per path (400 ``TOO_MANY_SYMLINKS``), as the kernel's ``ELOOP``.
"""

from __future__ import annotations

from oma.restore.filesystems import Entry, FileSystem
from pyapp.api import ApiError

PATH_TRAVERSAL = "PATH_TRAVERSAL"
TOO_MANY_SYMLINKS = "TOO_MANY_SYMLINKS"
PATH_NOT_FOUND = "PATH_NOT_FOUND"
NOT_A_DIRECTORY = "NOT_A_DIRECTORY"
MAX_SYMLINKS = 40


def traversal(message: str) -> ApiError:
    return ApiError(400, PATH_TRAVERSAL, message)


def split_request_path(raw: str) -> tuple[str, ...]:
    """The segments of a client's path, or :class:`ApiError` ``PATH_TRAVERSAL``."""
    if "\x00" in raw:
        raise traversal("the path holds a NUL byte")
    if "\\" in raw:
        raise traversal("the path holds a backslash; use '/' as the separator")
    parts = tuple(p for p in raw.split("/") if p not in ("", "."))
    if ".." in parts:
        raise traversal("'..' segments are not allowed; name paths from the mount root")
    return parts


def display(parts: tuple[str, ...] | list[str]) -> str:
    return "/" + "/".join(parts)


def resolve(
    fs: FileSystem, parts: tuple[str, ...], *, follow_last: bool, prefix: tuple[str, ...] = ()
) -> tuple[Entry, tuple[str, ...]]:
    """The entry at ``parts`` below ``fs``'s root, and its canonical path (links resolved).

    ``follow_last`` False answers for a symlink itself (``lstat``), True for what it points to.
    ``prefix`` (the volume directory in a multi-volume mount) only decorates error messages.
    Raises :class:`ApiError`: 400 ``PATH_TRAVERSAL`` / ``TOO_MANY_SYMLINKS`` /
    ``NOT_A_DIRECTORY``, 404 ``PATH_NOT_FOUND``.
    """
    stack: list[Entry] = [fs.root()]
    names: list[str] = []
    pending = list(parts)
    links = 0
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":  # only symlink targets bring these (request paths are checked above)
            if not names:
                raise traversal("a symbolic link on this path points outside the file system")
            stack.pop()
            names.pop()
            continue
        current = stack[-1]
        if current.kind != "directory":
            raise ApiError(400, NOT_A_DIRECTORY, f"{display((*prefix, *names))} is not a directory")
        child = fs.lookup(current, name)
        if child is None:
            raise ApiError.not_found(f"{display((*prefix, *names, name))} does not exist", PATH_NOT_FOUND)
        if child.kind == "symlink" and (pending or follow_last):
            links += 1
            if links > MAX_SYMLINKS:
                raise ApiError(
                    400, TOO_MANY_SYMLINKS, f"more than {MAX_SYMLINKS} symbolic links on this path"
                )
            target = child.link_target or ""
            if not target or "\x00" in target:
                raise ApiError.not_found(
                    f"{display((*prefix, *names, name))} is an empty link", PATH_NOT_FOUND
                )
            if target.startswith("/"):
                raise traversal(
                    f"{display((*prefix, *names, name))} is a symbolic link to an absolute path,"
                    " outside the file system"
                )
            if _climbs_out(len(names), target):
                raise traversal(
                    f"{display((*prefix, *names, name))} is a symbolic link leading outside the file system"
                )
            pending = target.split("/") + pending
            continue
        stack.append(child)
        names.append(child.name)
    return stack[-1], tuple(names)


def _climbs_out(depth: int, target: str) -> bool:
    """Whether ``target``, read lexically from a directory ``depth`` levels below the root,
    climbs above the root at some point. Checked before resolving, so a link that leaves is
    refused as such even when the names on its way do not exist (``missing/../../..``)."""
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False
