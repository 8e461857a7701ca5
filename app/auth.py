"""Who is visiting: the login gate every page passes through before the app runs.

The mode comes from `dpo-kernels app --auth ...` (dpo_engine/serve.py passes it in the
environment): `none` (loopback only: the person at this machine), `oidc` (Streamlit's own
login, `st.login`, configured under `[auth]` in .streamlit/secrets.toml), or `proxy` (an
authenticating reverse proxy puts the user name in a header, which must be on the allow-list).
The user found is recorded as the acting user of this script run, so every job and dataset
submitted in it carries `submitted_by`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import streamlit as st

from dpo_engine.serve import ENV_ALLOWED_USERS, ENV_AUTH, ENV_AUTH_HEADER
from dpo_engine.workspace import acting_user, current_user


def proxy_user(headers: Mapping[str, str], header: str, allowed: set[str]) -> str | None:
    """The allowed user named by the proxy's header, or None (header missing or user not allowed)."""
    wanted = header.lower()
    value = next((v for k, v in headers.items() if k.lower() == wanted), "")
    user = (value or "").strip()
    return user if user and user in allowed else None


def require_user() -> str:
    """Return the visitor's name, or show the login (or a refusal) and stop this script run."""
    mode = os.environ.get(ENV_AUTH, "none")
    if mode == "oidc":
        if not st.user.is_logged_in:
            st.title("DPO-Kernels Studio")
            st.write("Sign in to use this workspace.")
            st.button("Log in", on_click=st.login, type="primary")
            st.stop()
        user = str(st.user.get("email") or st.user.get("preferred_username") or st.user.get("sub"))
        st.sidebar.caption(f"Signed in as {user}")
        st.sidebar.button("Log out", on_click=st.logout)
    elif mode == "proxy":
        allowed = {u.strip() for u in os.environ.get(ENV_ALLOWED_USERS, "").split(",") if u.strip()}
        found = proxy_user(dict(st.context.headers), os.environ.get(ENV_AUTH_HEADER, ""), allowed)
        if found is None:
            st.error("Access denied: you are not on this workspace's allow-list.")
            st.stop()
        user = found
        st.sidebar.caption(f"Signed in as {user}")
    else:
        user = current_user()
    acting_user.set(user)
    return user
