# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The subset of oVirt's search language that clients send.

Seen in the wild: ``name=foo``, ``name="foo bar"``, ``id=<uuid>``,
``storage.name=nfs1``, ``hw_id=<id> and datacenter=Default and status=Up``,
``correlation_id=<cid>``; ``*`` is a wildcard, ``and`` binds tighter than
``or``, and an optional ``Disks:`` style prefix names the collection. Values
compare case-insensitively unless the request says ``case_sensitive=true``
(the default of the REST API); enum fields such as ``status`` always ignore
case, as the engine's search does.
"""

from __future__ import annotations

import re

from lab.engine import errors

TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<op>!=|<=|>=|=|<|>)
      | (?P<word>[^\s"=!<>]+)
    )""",
    re.VERBOSE,
)
PREFIX = re.compile(r"^\s*[A-Za-z]+\s*:")


class Field:
    """How to read one searchable field from an entity: one value or a list of them."""

    def __init__(self, getter, enum: bool = False):
        self.getter = getter
        self.enum = enum

    def values(self, entity) -> list:
        value = self.getter(entity)
        if isinstance(value, (list, tuple, set)):
            return list(value)
        return [value]


class Condition:
    def __init__(self, name: str, op: str, value: str):
        self.name = name
        self.op = op
        self.value = value

    def matches(self, field: Field, entity, case_sensitive: bool) -> bool:
        fold = field.enum or not case_sensitive
        found = any(self._compare(v, fold) for v in field.values(entity))
        return (not found) if self.op == "!=" else found

    def _compare(self, actual, fold: bool) -> bool:
        if actual is None:
            return False
        if isinstance(actual, bool):
            actual = "true" if actual else "false"
        wanted = self.value
        text = str(actual)
        if fold:
            text, wanted = text.casefold(), wanted.casefold()
        if self.op in ("=", "!="):
            if "*" in wanted:
                pattern = ".*".join(re.escape(part) for part in wanted.split("*"))
                return re.fullmatch(pattern, text, re.DOTALL) is not None
            return text == wanted
        try:
            left, right = float(text), float(wanted)
        except ValueError:
            left, right = text, wanted
        return {
            "<": left < right,
            ">": left > right,
            "<=": left <= right,
            ">=": left >= right,
        }[self.op]


class Query:
    """Alternatives (or) of conjunctions (and) of conditions."""

    def __init__(self, alternatives: list[list[Condition]]):
        self.alternatives = alternatives

    def matches(self, fields: dict[str, Field], entity, case_sensitive: bool) -> bool:
        return any(
            all(c.matches(fields[c.name], entity, case_sensitive) for c in conjunction)
            for conjunction in self.alternatives
        )


def parse(text: str, fields: dict[str, Field], collection: str) -> Query:
    """Parse a search; unknown fields and syntax errors are a 400 fault."""
    text = PREFIX.sub("", text, count=1)
    tokens = _tokenize(text)
    alternatives: list[list[Condition]] = [[]]
    pos = 0
    while pos < len(tokens):
        kind, value = tokens[pos]
        if kind == "word" and value.lower() in ("and", "or"):
            if not alternatives[-1] or pos == len(tokens) - 1:
                raise _invalid(text, f"misplaced '{value}'")
            if value.lower() == "or":
                alternatives.append([])
            pos += 1
            continue
        if pos + 3 > len(tokens):
            raise _invalid(text, "expected <field><operator><value>")
        (k1, name), (k2, op), (k3, raw) = tokens[pos : pos + 3]
        if k1 != "word" or k2 != "op" or k3 == "op":
            raise _invalid(text, "expected <field><operator><value>")
        key = name.lower()
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise errors.bad_request(
                f"Cannot search {collection}: unknown field '{name}' in '{text}' "
                f"(searchable fields: {known})"
            )
        if k3 == "string":
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        alternatives[-1].append(Condition(key, op, raw))
        pos += 3
    if not alternatives[-1]:
        alternatives.pop()
    return Query(alternatives)


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise _invalid(text, f"unexpected text at '{text[pos:]}'")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


def _invalid(text: str, why: str) -> errors.ApiError:
    return errors.bad_request(f"Invalid search '{text}': {why}")


def select(
    items: list,
    search: str | None,
    fields: dict[str, Field],
    collection: str,
    case_sensitive: bool = True,
    limit: int | None = None,
) -> list:
    """Filter items by search (None or empty keeps all) and cap them at limit."""
    if search and search.strip():
        query = parse(search, fields, collection)
        items = [item for item in items if query.matches(fields, item, case_sensitive)]
    if limit is not None and limit >= 0:
        items = items[:limit]
    return items
