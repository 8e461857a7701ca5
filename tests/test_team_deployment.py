"""Team deployment: beyond loopback the app needs authentication, hides tracebacks, and records
who submitted each job and dataset."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from streamlit.testing.v1 import AppTest

from dpo_engine.serve import (
    APP_ENTRY,
    AuthSettings,
    DeploymentError,
    check_deployment,
    is_loopback,
    streamlit_command,
)
from dpo_engine.workspace import acting_user, current_user

CLI = [sys.executable, "-m", "dpo_engine.cli"]
GOOD_SECRETS = """
[auth]
redirect_uri = "https://studio.example.org/oauth2callback"
cookie_secret = "a-long-random-string-for-cookies"
client_id = "studio"
client_secret = "s3cret"
server_metadata_url = "https://login.example.org/.well-known/openid-configuration"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_app_beyond_loopback_without_auth_refuses_to_start(tmp_path):
    host, port = "0.0.0.0", _free_port()
    out = subprocess.run(
        [*CLI, "app", "--host", host, "--port", str(port), "--no-sample", "--workspace", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: refusing to serve on {host} without authentication")
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert not _port_open(port)
    for other in ("::", "10.1.2.3", "studio.example.org"):
        with pytest.raises(DeploymentError, match=f"^refusing to serve on {other} without authentication"):
            check_deployment(other, AuthSettings())


def test_loopback_needs_no_auth_and_keeps_error_details():
    for host in (None, "127.0.0.1", "localhost", "::1", "127.0.1.1"):
        assert is_loopback(host)
        check_deployment(host, AuthSettings())
    assert "--client.showErrorDetails=full" in streamlit_command("127.0.0.1", 8501)
    beyond = streamlit_command("0.0.0.0", 8501)
    assert "--client.showErrorDetails=none" in beyond and "--client.showErrorDetails=full" not in beyond
    assert beyond[beyond.index("run") + 1] == str(APP_ENTRY)


def test_oidc_needs_complete_auth_secrets(tmp_path):
    secrets = tmp_path / "secrets.toml"
    with pytest.raises(DeploymentError, match=r"^--auth oidc: no \[auth\] section in "):
        check_deployment("0.0.0.0", AuthSettings(mode="oidc"), secrets_files=(secrets,))
    secrets.write_text(GOOD_SECRETS.replace('client_secret = "s3cret"\n', ""))
    with pytest.raises(DeploymentError, match="lacks a provider with client_id, client_secret, server_metadata_url"):
        check_deployment("0.0.0.0", AuthSettings(mode="oidc"), secrets_files=(secrets,))
    secrets.write_text(GOOD_SECRETS)
    check_deployment("0.0.0.0", AuthSettings(mode="oidc"), secrets_files=(secrets,))
    named = GOOD_SECRETS.replace("client_id", "[auth.company]\nclient_id")  # a named provider
    secrets.write_text(named)
    check_deployment("0.0.0.0", AuthSettings(mode="oidc"), secrets_files=(secrets,))


def test_proxy_mode_needs_a_header_and_an_allow_list():
    with pytest.raises(DeploymentError, match="needs an allow-list"):
        check_deployment("0.0.0.0", AuthSettings(mode="proxy"))
    with pytest.raises(DeploymentError, match="invalid --allow-header 'X User'"):
        check_deployment("0.0.0.0", AuthSettings(mode="proxy", header="X User", allowed_users=("alice",)))
    check_deployment("0.0.0.0", AuthSettings(mode="proxy", allowed_users=("alice",)))
    with pytest.raises(DeploymentError, match="unknown --auth 'basic'"):
        check_deployment("127.0.0.1", AuthSettings(mode="basic"))


def test_proxy_user_comes_from_the_header_and_the_allow_list():
    from app.auth import proxy_user

    allowed = {"alice", "bob"}
    assert proxy_user({"x-forwarded-user": "alice"}, "X-Forwarded-User", allowed) == "alice"
    assert proxy_user({"X-Forwarded-User": " bob "}, "X-Forwarded-User", allowed) == "bob"
    assert proxy_user({"X-Forwarded-User": "mallory"}, "X-Forwarded-User", allowed) is None
    assert proxy_user({}, "X-Forwarded-User", allowed) is None


def test_gate_denies_a_visitor_the_proxy_did_not_name(monkeypatch):
    monkeypatch.setenv("DPO_KERNELS_AUTH", "proxy")
    monkeypatch.setenv("DPO_KERNELS_AUTH_HEADER", "X-Forwarded-User")
    monkeypatch.setenv("DPO_KERNELS_ALLOWED_USERS", "alice")
    at = AppTest.from_file(str(APP_ENTRY), default_timeout=60).run()
    assert not at.exception
    assert [e.value for e in at.error] == ["Access denied: you are not on this workspace's allow-list."]
    assert not at.title and not at.tabs  # the app itself never ran


def test_gate_lets_the_local_user_into_the_app(workspace, monkeypatch):
    monkeypatch.delenv("DPO_KERNELS_AUTH", raising=False)
    at = AppTest.from_file(str(APP_ENTRY), default_timeout=60).run()
    assert not at.exception and not at.error
    assert at.title  # the default page rendered


def test_submitter_is_recorded_on_jobs_and_datasets(workspace, hh_sample_path):
    from dpo_engine.data import DatasetStore, load_preferences
    from dpo_engine.jobs import JobStore

    store = JobStore.for_workspace(workspace)
    local = store.submit("selftest", {})
    token = acting_user.set("alice@example.org")
    try:
        assert current_user() == "alice@example.org"
        web = store.submit("selftest", {})
        info = DatasetStore(workspace).add(load_preferences(hh_sample_path), name="hh", source="hh.jsonl.gz")
    finally:
        acting_user.reset(token)
    explicit = store.submit("selftest", {}, submitted_by="bob")
    assert [store.get(j.id).submitted_by for j in (local, web, explicit)] == [
        current_user(),
        "alice@example.org",
        "bob",
    ]
    meta = json.loads((workspace.datasets_dir / info.id / "meta.json").read_text())
    assert meta["submitted_by"] == "alice@example.org"
    store.close()
