"""Checks the request schemas (server/schemas.py) run on a raw body before pydantic's
own: where a NUL is, and a list validated item by item (one bad item of a check-in
is left out and named, never the cause of a refused check-in)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError


def nul_at(value: Any, where: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    """Where the first NUL is in parsed JSON (an event's free-form `data` aside), or None."""
    if isinstance(value, str):
        return where if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and "\x00" in k:
                return (*where, k)
            if k != "data":
                found = nul_at(v, (*where, k))
                if found is not None:
                    return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = nul_at(v, (*where, i))
            if found is not None:
                return found
    return None


class Items:
    """A list field of `model`s, named `name`, validated item by item."""

    def __init__(self, name: str, model: type[BaseModel]) -> None:
        self.name = name
        self.model = model
        self.adapter = TypeAdapter(list[model])  # type: ignore[valid-type]

    def valid(self, items: list[Any], ignored: list[str]) -> list[Any]:
        """The items that are valid, as models; one line in `ignored` for each other.
        The whole list in one go first (the common case, at pydantic's own speed)."""
        if nul_at(items) is None:
            try:
                return list(self.adapter.validate_python(items))
            except ValidationError:
                pass
        kept = []
        for i, item in enumerate(items):
            try:
                if nul_at(item) is not None:
                    raise ValueError("must not contain NUL characters")
                kept.append(self.model.model_validate(item))
            except (ValidationError, ValueError) as e:
                ignored.append(f"{self.name}[{i}]: {first_problem(e)}")
        return kept


def first_problem(e: Exception) -> str:
    """The first thing wrong, where (and how many more there are)."""
    if isinstance(e, ValidationError) and e.errors():
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        return f"{where + ': ' if where else ''}{first['msg']}{more}"
    return str(e)
