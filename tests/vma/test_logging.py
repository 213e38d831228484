"""JSON log lines with the seed's fields, job and action taken from the task's context."""

from __future__ import annotations

import io
import json
import logging

from pyapp.logs import JsonFormatter, log_context


def test_json_lines_carry_job_id_and_action() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("vma.test")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with log_context(job_id="repl-1", action="replicate"):
            log.info("copying %s", "disk-2000", extra={"disk_id": "disk-2000"})
            with log_context(action="copy_disk"):
                log.warning("slow")
        log.info("outside", extra={"action": "startup"})
    finally:
        log.removeHandler(handler)
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [(x["level"], x["message"], x["job_id"], x["action"]) for x in lines] == [
        ("info", "copying disk-2000", "repl-1", "replicate"),
        ("warning", "slow", "repl-1", "copy_disk"),
        ("info", "outside", None, "startup"),
    ]
    assert lines[0]["disk_id"] == "disk-2000"
    assert lines[0]["timestamp"].endswith("Z")
