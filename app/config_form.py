"""Render any pydantic settings model as a Streamlit form, so forms never drift from the config.

The form is generated from the model's fields: Literal -> selectbox, bool -> checkbox, int/float
-> number input bounded by the field's constraints, str -> text input, list[str] -> comma list,
optional numbers -> text input where empty means what the setting's help says (a default, "auto",
"all"), nested models -> a titled group.
Help texts are dpo_engine.schema's, the same the CLI's flags show. The caller validates the returned dict
with the model itself (one source of truth for rules) and hands errors back for display next to
the offending fields.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import streamlit as st
from pydantic import BaseModel

from dpo_engine.schema import (
    SettingSpec,
    is_group,
    leaf_settings,
    unwrap_optional,
    value_text,
)
from dpo_engine.schema import help_text as setting_help

RECOMMENDED_MARK = "⭐"


@dataclass
class FormOptions:
    """Per-field customisation: prefilled values, notes (e.g. 'recommended by diagnosis'), custom widgets."""

    values: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    widgets: dict[str, Callable[[SettingSpec, Any, str], Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    group_titles: dict[str, str] = field(default_factory=dict)
    columns: int = 3


def _label(spec: SettingSpec, note: str | None) -> str:
    label = spec.name.replace("_", " ")
    return f"{label} {RECOMMENDED_MARK}" if note else label


class _Unparsable(str):
    """A text entry that is not a number; validation reports it next to the field."""


def _parse_optional_number(text: str, kind: type) -> Any:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
    except ValueError:
        return _Unparsable(text)


def _widget(spec: SettingSpec, value: Any, key: str, note: str | None) -> Any:
    label, help_text = _label(spec, note), setting_help(spec)
    annotation = spec.annotation
    if typing.get_origin(annotation) is Literal:
        options = list(typing.get_args(annotation))
        index = options.index(value) if value in options else 0
        return st.selectbox(label, options, index=index, key=key, help=help_text)
    if annotation is bool:
        return st.checkbox(label, value=bool(value), key=key, help=help_text)
    if annotation in (int, float) and spec.optional:
        entered = st.text_input(
            label,
            value="" if value is None else value_text(value),
            key=key,
            help=help_text,
            placeholder="empty = what the help (?) says",
        )
        return _parse_optional_number(entered, annotation)
    if annotation is int:
        return int(
            st.number_input(
                label,
                value=int(value if value is not None else spec.lower or 0),
                min_value=None if spec.lower is None else int(spec.lower),
                max_value=None if spec.upper is None else int(spec.upper),
                step=1,
                key=key,
                help=help_text,
            )
        )
    if annotation is float:
        return float(
            st.number_input(
                label,
                value=float(value if value is not None else spec.lower or 0.0),
                min_value=None if spec.lower is None else float(spec.lower),
                max_value=None if spec.upper is None else float(spec.upper),
                format="%g",
                key=key,
                help=help_text,
            )
        )
    if typing.get_origin(annotation) is list:
        entered = st.text_input(
            label,
            value=value_text(value) if value else "",
            key=key,
            help=help_text + " Separate entries with commas.",
        )
        return [item.strip() for item in entered.split(",") if item.strip()]
    entered = st.text_input(label, value="" if value is None else str(value), key=key, help=help_text)
    return entered if entered.strip() or not spec.optional else None


def _set(tree: dict, path: str, value: Any) -> None:
    keys = path.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def render_model_form(
    model: type[BaseModel],
    options: FormOptions | None = None,
    *,
    key: str = "form",
    _prefix: str = "",
    _depth: int = 0,
    _out: dict | None = None,
) -> dict:
    """Draw widgets for every field of `model` (inside the caller's st.form) and return the raw values.

    The result is a nested dict shaped like the model, ready for `model.model_validate`.
    """
    options = options or FormOptions()
    out = {} if _out is None else _out
    leaves = []
    for name, info in model.model_fields.items():
        annotation, _ = unwrap_optional(info.annotation)
        path = f"{_prefix}{name}"
        if is_group(annotation):
            continue
        leaves.append((path, info))
    if leaves:
        cols = st.columns(options.columns) if options.columns > 1 else [st.container()]
        for i, (path, _info) in enumerate(leaves):
            spec = next(s for s in leaf_settings(model, _prefix) if s.path == path)
            value = options.values.get(path, spec.default)
            note = options.notes.get(path)
            with cols[i % len(cols)]:
                custom = options.widgets.get(path)
                result = custom(spec, value, f"{key}.{path}") if custom else _widget(spec, value, f"{key}.{path}", note)
                if note:
                    st.caption(f"{RECOMMENDED_MARK} {note}")
                if path in options.errors:
                    st.error(options.errors[path], icon="⚠️")
            _set(out, path, result)
    for name, info in model.model_fields.items():
        annotation, _ = unwrap_optional(info.annotation)
        if not is_group(annotation):
            continue
        path = f"{_prefix}{name}"
        title = options.group_titles.get(path, name.replace("_", " ").capitalize())
        if _depth == 0:
            st.subheader(title)
            if info.description:
                st.caption(info.description)
            render_model_form(annotation, options, key=key, _prefix=path + ".", _depth=1, _out=out)
        else:
            with st.container(border=True):
                st.markdown(f"**{title}**" + (f" · {info.description}" if info.description else ""))
                render_model_form(annotation, options, key=key, _prefix=path + ".", _depth=_depth + 1, _out=out)
        if path in options.errors:
            st.error(options.errors[path], icon="⚠️")
    return out


def attach_errors(errors: dict[str, str], model: type[BaseModel]) -> dict[str, str]:
    """Map each error to the nearest rendered field or group (model-level errors go to their group)."""
    known = {s.path for s in leaf_settings(model)}
    groups = {p.rsplit(".", 1)[0] for p in known if "." in p}
    groups |= {".".join(g.split(".")[:i]) for g in list(groups) for i in range(1, g.count(".") + 1)}
    out: dict[str, str] = {}
    for path, message in errors.items():
        target = path
        while target and target not in known and target not in groups:
            target = target.rsplit(".", 1)[0] if "." in target else ""
        out[target] = f"{out[target]}; {message}" if target in out else message
    return out
