"""Read-only copies of nested JSON-like data, and their JSON form back: how the typed results stay frozen."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["DictReads", "check_stored", "json_form", "read_only"]


def read_only(value: Any) -> Any:
    """A read-only copy: mappings as ``MappingProxyType`` (nested too), lists as tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: read_only(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(read_only(v) for v in value)
    return value


def json_form(value: Any) -> Any:
    """The JSON form of :func:`read_only`'s output: dicts and lists."""
    if isinstance(value, Mapping):
        return {k: json_form(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [json_form(v) for v in value]
    return value


def check_stored(data: Any, key: str, what: str, note: str = "") -> None:
    """Refuse stored data that is not a mapping holding ``key`` (what every typed result's ``from_dict`` needs)."""
    if not isinstance(data, Mapping) or key not in data:
        keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"SPE: {what} needs at least {key!r} (got {keys}){'; ' + note if note else ''}.")


class DictReads:
    """Dict-style reads of a typed result's :meth:`to_dict` form (``x["value"]``, ``x.get("reason")``, ``"k" in
    x``, ``dict(x)``): code written when these results were plain dicts keeps working. Read-only; new code reads
    the attributes, and ``json.dumps`` needs ``to_dict()``."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        """``to_dict().get(key, default)``."""
        return self.to_dict().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def keys(self) -> Any:
        """The keys of :meth:`to_dict`."""
        return self.to_dict().keys()

    def items(self) -> Any:
        """The items of :meth:`to_dict`."""
        return self.to_dict().items()

    def values(self) -> Any:
        """The values of :meth:`to_dict`."""
        return self.to_dict().values()

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())
