"""Named entries of one kind (datasets, presets, search spaces), keyed by the lowercase value users type on the CLI.

One implementation of the rules every such table follows (timm's ``_registry.py``, made stricter): entries are added
explicitly, a key added twice is an error, and an unknown key's error lists the known ones. Called a catalog, not a
registry: in this project "registry" is MLflow's model registry.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Catalog(Generic[T]):
    """A table of named entries of one kind.

    Args:
        kind: what an entry is, for the duplicate-key error (``"dataset"`` -> "dataset 'x' is already registered").
        entry_type: the class every entry must be (None: any), checked by :meth:`add`.
        unknown: the unknown-key error before its list of known keys, with ``{name}`` for the key asked for
            (default: ``"unknown <kind> {name!r}"``).
    """

    def __init__(self, kind: str, entry_type: type | None = None, unknown: str | None = None) -> None:
        self.kind = kind
        self.entry_type = entry_type
        self._unknown = unknown or f"unknown {kind} {{name!r}}"
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; returns it.

        Raises:
            ValueError: ``entry`` is not an ``entry_type``, or ``name`` is already in the catalog.
        """
        if self.entry_type is not None and not isinstance(entry, self.entry_type):
            raise ValueError(f"register_{self.kind.replace(' ', '_')} expects a {self.entry_type.__name__}, got "
                             f"{type(entry).__name__}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry under ``name``.

        Raises:
            ValueError: ``name`` is not in the catalog; the message lists the names that are.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"{self._unknown.format(name=name)}; available: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """The catalog's keys, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
