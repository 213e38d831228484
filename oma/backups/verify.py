"""Verifying a backup point: is every stored copy of it still what was backed up?

QCOW2 has no checksums of its data, so a bit flipped on a repository's disk would otherwise go
unnoticed until the restore. Each file of the point's chain — in the primary repository and in
every repository holding a completed copy — is re-read through its own backing files and compared
chunk by chunk with its own BLAKE3 manifest (``mover.verify_chain``), so a flipped byte is found
in whichever layer holds it, even where a newer layer hides it from the point's own view. The
point's disk digest must also still equal the one recorded when it was written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from oma.backups.repositories import ensure_ready
from oma.crypto import SecretBox
from pyapp import mover
from pyapp.api import ApiError
from pyapp.db import Database

log = logging.getLogger(__name__)

#: Mismatching chunks listed per file in an answer (the count is always complete).
MAX_LISTED = 20


async def verify_replica(path: Path, expected_digest: str | None) -> dict[str, Any]:
    """Verify one stored chain whose top is ``path``."""
    answer: dict[str, Any] = {"file_path": str(path), "ok": False, "files": [], "unverified": []}
    try:
        reports, unverified = await mover.verify_chain(path)
    except mover.MoverError as e:
        answer["error"] = f"{type(e).__name__}: {e}"
        return answer
    answer["unverified"] = unverified
    ok = not unverified
    for report in reports:
        ok = ok and not report.mismatches
        answer["files"].append(
            {
                "image": report.image,
                "ok": not report.mismatches,
                "expected_digest": report.expected_digest,
                "found_digest": report.found_digest,
                "mismatch_count": len(report.mismatches),
                "mismatches": [
                    {
                        "chunk": m.index,
                        "offset": m.offset,
                        "length": m.length,
                        "expected": m.expected,
                        "found": m.found,
                    }
                    for m in report.mismatches[:MAX_LISTED]
                ],
            }
        )
    top = answer["files"][0] if answer["files"] else None
    if expected_digest and top is not None and top["expected_digest"] != expected_digest:
        ok = False
        answer["error"] = (
            f"the manifest of {path} describes disk {top['expected_digest']},"
            f" the backup recorded {expected_digest}"
        )
    answer["ok"] = ok
    return answer


async def verify_backup(db: Database, box: SecretBox, mounts_dir: Path, backup_id: str) -> dict[str, Any]:
    """``POST /api/v1/backup/{id}/verify``: verify the point in every repository holding it."""
    row = await db.fetchrow(
        "SELECT id, status, repository_id, file_path, disk_digest FROM backup_jobs WHERE id = $1", backup_id
    )
    if row is None:
        raise ApiError.not_found(f"backup {backup_id} not found")
    if row["status"] != "completed" or not row["file_path"]:
        raise ApiError.conflict(
            f"backup {backup_id} is {row['status']}: only completed points can be verified"
        )
    replicas: list[tuple[str, str | None, Path]] = [(row["repository_id"], None, Path(row["file_path"]))]
    copies = await db.fetch(
        "SELECT id, repository_id, file_path FROM backup_copies"
        " WHERE backup_id = $1 AND status = 'completed' ORDER BY created_at",
        backup_id,
    )
    replicas += [(c["repository_id"], c["id"], Path(c["file_path"])) for c in copies]
    results = []
    for repository_id, copy_id, path in replicas:
        await ensure_ready(db, box, mounts_dir, repository_id)
        result = await verify_replica(path, row["disk_digest"])
        results.append({"repository_id": repository_id, "copy_id": copy_id, **result})
        if not result["ok"]:
            log.error(
                "backup %s failed verification in %s",
                backup_id,
                repository_id,
                extra={"backup_id": backup_id, "file_path": str(path), "error": result.get("error")},
            )
    ok = all(r["ok"] for r in results)
    return {"backup_id": backup_id, "ok": ok, "disk_digest": row["disk_digest"], "replicas": results}
