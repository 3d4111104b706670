"""One registry mechanism for every interchangeable piece: a name, a one-line help, the object.

Construction methods, routers, mark statistics, groupings, representatives, budgets and presets are
each a `Registry`; the CLI builds its choices and help text from them, and an unknown name is refused in
one line that lists the known ones. A new piece registers itself from anywhere (a plug-in, a test file)
without touching cmoe.
"""

from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

from cmoe.errors import CmoeError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    help: str
    value: T


class Registry(Generic[T]):
    """Named pieces of one kind, in registration order; `flag` is the option that chooses among them."""

    def __init__(
        self,
        kind: str,
        flag: str,
        on_register: Callable[[str, T], None] | None = None,
        on_unregister: Callable[[str], None] | None = None,
    ):
        self.kind = kind
        self.flag = flag
        self._entries: dict[str, Entry[T]] = {}
        self._on_register = on_register
        self._on_unregister = on_unregister

    def register(self, name: str, help: str, value: T | None = None, *, replace: bool = False):
        """Register `value` under `name`; without `value`, return a decorator that registers its target."""
        if value is None:
            return lambda target: self.register(name, help, target, replace=replace)
        if not name or name != name.strip():
            raise ValueError(f"invalid {self.kind} name {name!r}")
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if self._on_register is not None:
            self._on_register(name, value)
        self._entries[name] = Entry(name, help, value)
        return value

    def unregister(self, name: str) -> None:
        if self._entries.pop(name, None) is not None and self._on_unregister is not None:
            self._on_unregister(name)

    def check(self, name: str, flag: str | None = None) -> str:
        """`name`, or one CmoeError naming the option (`flag` where another option than the registry's own
        chooses from it) and listing the known names."""
        if name not in self._entries:
            raise CmoeError(f"{flag or self.flag} {name}: expected one of {', '.join(self._entries)}")
        return name

    def get(self, name: str) -> T:
        return self._entries[self.check(name)].value

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(entry.name, entry.value) for entry in self._entries.values()]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def help_text(self) -> str:
        """`a (help of a), b (help of b)`: the text a CLI option lists its choices with."""
        return "; ".join(f"{entry.name}: {entry.help}" for entry in self._entries.values())
