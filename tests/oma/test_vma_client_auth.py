"""The OMA signs every request to the VMA with the enrolled VMA's secret (``vma_secret_file``);
the VMA (here its double, which checks as the real one does) refuses anything else."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from vma_double import VmaDouble, double_secret_file, run_vma_double

from oma.vma_client import VmaClient, VmaJobNotFound, VmaRequestFailed


async def test_the_oma_signs_its_requests_and_a_wrong_secret_is_refused(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-enrollment-secret\n")
    async with run_vma_double(VmaDouble()) as vma, httpx.AsyncClient(timeout=10) as http:
        good = VmaClient(http, vma.base_url, double_secret_file())
        with pytest.raises(VmaJobNotFound):  # authenticated: the double looked the job up
            await good.progress("repl-1")
        rotating = VmaClient(http, vma.base_url, wrong)
        others = (VmaClient(http, vma.base_url, None), VmaClient(http, vma.base_url, tmp_path / "x"))
        for bad in (rotating, *others):
            with pytest.raises(VmaRequestFailed) as failed:
                await bad.progress("repl-1")
            assert failed.value.status == 401
            assert failed.value.code == "UNAUTHORIZED"
            assert "OMA_VMA_SECRET_FILE" in failed.value.message
        assert vma.refused == [("GET", "/api/v1/progress/repl-1")] * 3
        # The secret file is re-read when it changes (a new enrollment needs no restart).
        wrong.write_text(vma.secret + "\n")
        await rotating.put_config(nbd_port=10809, export_name="x", target_device="/dev/vdb")
