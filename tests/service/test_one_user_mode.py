"""A server that cannot keep teams apart says so: on its first line, and on the cluster
page (a real ``corral server --isolation none``, read over HTTP as a browser would)."""

from __future__ import annotations

import html
import signal

import httpx
import pytest
from conftest import start_server

from corral.service.isolation import ONE_USER_WARNING

pytestmark = pytest.mark.slow


def test_one_user_mode_is_said_first_and_on_the_cluster_page(tmp_path):
    proc, url, token = start_server(tmp_path, "--cpus", "2", "--isolation", "none")
    try:
        assert proc.output[0].strip() == f"corral server: {ONE_USER_WARNING}"  # type: ignore[attr-defined]
        assert "as this server's user" in proc.banner  # type: ignore[attr-defined]
        with httpx.Client(base_url=url, timeout=30) as browser:
            browser.post("/login", data={"token": token, "next": "/cluster"})
            page = browser.get("/cluster")
        assert page.status_code == 200
        assert f"Jobs are not isolated: {ONE_USER_WARNING}." in html.unescape(page.text)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
