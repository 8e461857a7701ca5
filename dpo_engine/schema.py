"""Pydantic settings models as flat lists of settings: what the CLI's flags and the app's forms are built from.

One reading of a model (dotted path, type, bounds, default, description) and one help text per
setting, so a flag and its form field can never describe the same setting differently.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


@dataclass(frozen=True)
class SettingSpec:
    """One leaf setting of a settings model."""

    path: str  # dotted, e.g. "method.kernel.name"
    name: str
    annotation: Any  # with Optional[...] removed
    optional: bool  # None is allowed ("empty")
    default: Any
    required: bool
    description: str
    lower: float | None = None
    upper: float | None = None
    lower_strict: bool = False
    upper_strict: bool = False

    @property
    def choices(self) -> tuple[Any, ...]:
        """The allowed values of a Literal setting; () for any other type."""
        return typing.get_args(self.annotation) if typing.get_origin(self.annotation) is Literal else ()

    @property
    def is_bool(self) -> bool:
        return self.annotation is bool

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.annotation) is list


def unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(the type inside Optional[...], whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(args) == 2:
            return inner[0], True
    return annotation, False


def is_group(annotation: Any) -> bool:
    """A nested settings model (a titled group in a form, a dotted prefix on the command line)."""
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _bounds(info: FieldInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Ge):
            out["lower"] = meta.ge
        elif isinstance(meta, annotated_types.Gt):
            out["lower"], out["lower_strict"] = meta.gt, True
        elif isinstance(meta, annotated_types.Le):
            out["upper"] = meta.le
        elif isinstance(meta, annotated_types.Lt):
            out["upper"], out["upper_strict"] = meta.lt, True
    return out


def leaf_settings(model: type[BaseModel], prefix: str = "") -> list[SettingSpec]:
    """Every non-group field of `model`, depth first, with its dotted path."""
    out: list[SettingSpec] = []
    for name, info in model.model_fields.items():
        annotation, optional = unwrap_optional(info.annotation)
        path = f"{prefix}{name}"
        if is_group(annotation):
            out.extend(leaf_settings(annotation, path + "."))
            continue
        required = info.is_required()
        out.append(
            SettingSpec(
                path=path,
                name=name,
                annotation=annotation,
                optional=optional,
                default=None if required else info.get_default(call_default_factory=True),
                required=required,
                description=info.description or "",
                **_bounds(info),
            )
        )
    return out


def value_text(value: Any) -> str:
    """A setting's value as people write it: empty, on/off, a comma list, 1e-05."""
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "empty"
    return f"{value:g}" if isinstance(value, float) else str(value)


def allowed_text(spec: SettingSpec) -> str:
    """What values the setting takes, in words ('' when any text goes)."""
    if spec.choices:
        return ", ".join(map(str, spec.choices))
    if spec.annotation in (int, float):
        bounds = []
        if spec.lower is not None:
            bounds.append(f"{'>' if spec.lower_strict else '≥'} {spec.lower:g}")
        if spec.upper is not None:
            bounds.append(f"{'<' if spec.upper_strict else '≤'} {spec.upper:g}")
        kind = "integer" if spec.annotation is int else "number"
        return " ".join([kind, " and ".join(bounds)]).strip()
    if spec.is_list:
        (item,) = typing.get_args(spec.annotation) or (str,)
        choices = typing.get_args(item) if typing.get_origin(item) is Literal else ()
        return f"comma-separated list of {', '.join(map(str, choices))}" if choices else "comma-separated list"
    return ""


def help_text(spec: SettingSpec) -> str:
    """The one help text of a setting: its description, what it allows and its default."""
    parts = [(spec.description or spec.name.replace("_", " ")).rstrip(".") + "."]
    allowed = allowed_text(spec)
    if allowed:
        parts.append(f"Allowed: {allowed}.")
    parts.append(f"Default: {'(required)' if spec.required else value_text(spec.default)}.")
    return " ".join(parts)


def validation_errors(exc: ValidationError) -> dict[str, str]:
    """pydantic errors keyed by the dotted path of the setting they belong to ('' = the whole model)."""
    out: dict[str, str] = {}
    for error in exc.errors():
        path = ".".join(str(p) for p in error["loc"] if not isinstance(p, int))
        message = error["msg"].removeprefix("Value error, ")
        out[path] = f"{out[path]}; {message}" if path in out else message
    return out
