"""The catalog's filter language: ``family=sdxl rank>=32``, ``network=dora or network=lokr``.

An expression is terms ``FIELD OP VALUE`` joined by ``and`` (or plain spaces) and ``or``
(``and`` binds tighter), with ``not`` and parentheses. Operators: ``=`` ``!=`` ``<``
``<=`` ``>`` ``>=`` and ``~`` / ``!~`` (substring, or a glob when the value holds ``*``,
``?`` or ``[``). Text compares case-insensitively; list fields (``network``, ``codes``…)
match when any element does; numbers take size units (``size>2MB``, ``size<=1.5GiB``);
yes/no fields take ``yes|no|true|false|1|0``. Values with spaces go in quotes.

:func:`parse` turns an expression into a predicate over records, or raises a
:class:`~loratool.errors.UsageError` naming what is wrong (the CLI exits 2).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loratool.errors import UsageError
from loratool.library.record import autov3_of, validation_status
from loratool.library.sidecars import sidecar_kind

Record = dict[str, Any]
Predicate = Callable[[Record], bool]

TEXT, LIST, NUMBER, BOOL = "text", "list", "number", "yes/no"
OPS_BY_TYPE = {
    TEXT: ("=", "!=", "~", "!~"),
    LIST: ("=", "!=", "~", "!~"),
    NUMBER: ("=", "!=", "<", "<=", ">", ">="),
    BOOL: ("=", "!="),
}


@dataclass(frozen=True)
class Field:
    type: str
    get: Callable[[Record], Any]
    help: str


def _hash(name: str) -> Callable[[Record], Any]:
    def get(r: Record) -> Any:
        h = r.get("hashes")
        return h.get(name) if isinstance(h, dict) and isinstance(h.get(name), str) else None
    return get


# name -> (type, how to read it from a record, what it means): the README table mirrors it.
FIELDS: dict[str, Field] = {
    "path": Field(TEXT, lambda r: r["path"], "full path"),
    "name": Field(TEXT, lambda r: r["name"], "file or folder name"),
    "folder": Field(TEXT, lambda r: os.path.dirname(r["path"]), "the folder it lies in"),
    "root": Field(TEXT, lambda r: r["root"], "the scanned folder it was found under"),
    "kind": Field(TEXT, lambda r: r["kind"], "file or folder"),
    "format": Field(TEXT, lambda r: r["format"], "kohya, diffusers, peft, comfyui…"),
    "variant": Field(TEXT, lambda r: r["variant"], "format variant (attn-processor, lora_A/lora_B…)"),
    "family": Field(TEXT, lambda r: r["family"], "sd1, sd2, sdxl, sd3, flux, unknown…"),
    "network": Field(LIST, lambda r: r["network_types"], "network types (lora, locon, loha, lokr, dora, ia3…)"),
    "component": Field(LIST, lambda r: list(r["components"]), "components with modules (unet, text_encoder…)"),
    "rank": Field(NUMBER, lambda r: r["rank"]["max"], "highest rank"),
    "rank_min": Field(NUMBER, lambda r: r["rank"]["min"], "lowest rank"),
    "alpha": Field(NUMBER, lambda r: r["alpha"]["max"], "highest alpha"),
    "alpha_min": Field(NUMBER, lambda r: r["alpha"]["min"], "lowest alpha"),
    "modules": Field(NUMBER, lambda r: r["modules"], "number of modules"),
    "size": Field(NUMBER, lambda r: r["size"], "bytes (units: KB MB GB, KiB MiB GiB)"),
    "dtype": Field(LIST, lambda r: r["dtypes"], "tensor dtypes as stored (F16, BF16, F32…)"),
    "base_model": Field(TEXT, lambda r: r["base_model"], "ss_base_model_version, else modelspec.architecture, else ss_sd_model_name"),
    "title": Field(TEXT, lambda r: r["title"], "modelspec.title, else ss_output_name"),
    "sha256": Field(TEXT, _hash("sha256"), "file SHA-256 (with --hashes)"),
    "autov1": Field(TEXT, _hash("autov1"), "AutoV1 (with --hashes)"),
    "autov2": Field(TEXT, _hash("autov2"), "AutoV2 (with --hashes)"),
    "autov3": Field(TEXT, autov3_of, "AutoV3 (with --hashes)"),
    "error": Field(BOOL, lambda r: r["error"] is not None, "the file could not be read in full"),
    "reason": Field(TEXT, lambda r: r["error"], "the error message"),
    "complete": Field(BOOL, lambda r: r["complete"], "every tensor's bytes are present"),
    "valid": Field(TEXT, validation_status, "validation: ok, warnings, errors or unchecked"),
    "codes": Field(LIST, lambda r: (r["validation"] or {}).get("codes", []), "validation finding codes"),
    "sidecar": Field(LIST, lambda r: [sidecar_kind(n) for n in r["sidecars"]], "kinds of sidecars: civitai-info, preview, image, json, txt"),
    "sidecars": Field(NUMBER, lambda r: len(r["sidecars"]), "number of sidecar files"),
}

UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
         "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
BOOLS = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<paren>[()])
    | (?P<field>[A-Za-z_][A-Za-z0-9_]*) \s* (?P<op>!=|<=|>=|!~|=|<|>|~) \s*
      (?P<value>"[^"]*"|'[^']*'|[^\s()"']+)?
    | (?P<word>[^\s()]+)
    )""", re.VERBOSE)
KEYWORDS = ("and", "or", "not")


def _usage(message: str) -> UsageError:
    return UsageError("--query", message)


def parse(expr: str) -> Predicate:
    """A predicate for ``expr``; a :class:`UsageError` says what is wrong with it."""
    tokens = _tokens(expr)
    if not tokens:
        raise _usage("empty expression (e.g. \"family=sdxl rank>=32\")")
    parser = _Parser(tokens)
    predicate = parser.expr()
    if parser.pos < len(tokens):
        raise _usage(f"unexpected {tokens[parser.pos][1]!r}")
    return predicate


def _tokens(expr: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(expr):
        if not expr[pos:].strip():
            break
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:  # an unmatched quote
            raise _usage(f"cannot read {expr[pos:].strip()!r} (unbalanced quotes?)")
        pos = m.end()
        if m["paren"]:
            out.append(("paren", m["paren"]))
        elif m["field"]:
            if m["value"] is None:
                if expr[m.end():m.end() + 1] in ("'", '"'):
                    raise _usage(f"cannot read {expr[m.start('field'):].strip()!r} (unbalanced quotes?)")
                raise _usage(f"{m['field']}{m['op']} needs a value")
            out.append(("term", _term(m["field"], m["op"], _unquote(m["value"]))))
        elif m["word"].lower() in KEYWORDS:
            out.append(("keyword", m["word"].lower()))
        else:
            raise _usage(f"expected FIELD OP VALUE (e.g. family=sdxl), got {m['word']!r}; operators: = != < <= > >= ~ !~")
    return out


def _unquote(value: str) -> str:
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'" else value


def _term(name: str, op: str, raw: str) -> Predicate:
    field = FIELDS.get(name.lower())
    if field is None:
        raise _usage(f"unknown field {name!r}; fields: {', '.join(FIELDS)}")
    if op not in OPS_BY_TYPE[field.type]:
        raise _usage(f"{name}{op}{raw}: {name} is a {field.type} field; it takes {' '.join(OPS_BY_TYPE[field.type])}")
    get = field.get
    if field.type == NUMBER:
        return _number_term(name, op, raw, get)
    if field.type == BOOL:
        wanted = BOOLS.get(raw.lower())
        if wanted is None:
            raise _usage(f"{name}{op}{raw}: {name} takes yes or no")
        return lambda r: (bool(get(r)) == wanted) == (op == "=")
    match = _text_match(op.lstrip("!"), raw)
    negate = op.startswith("!")
    if field.type == LIST:
        return lambda r: any(match(v) for v in (get(r) or [])) != negate
    return lambda r: match(get(r)) != negate


def _text_match(op: str, raw: str) -> Callable[[Any], bool]:
    want = raw.casefold()
    if op == "=":
        return lambda v: v is not None and str(v).casefold() == want
    if any(c in raw for c in "*?["):
        return lambda v: v is not None and fnmatch.fnmatchcase(str(v).casefold(), want)
    return lambda v: v is not None and want in str(v).casefold()


def _number_term(name: str, op: str, raw: str, get: Callable[[Record], Any]) -> Predicate:
    m = re.fullmatch(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*([a-z]*)", raw.strip().lower())
    if m is None or m[2] not in UNITS:
        raise _usage(f"{name}{op}{raw}: {raw!r} is not a number")
    want = float(m[1]) * UNITS[m[2]]
    compare: dict[str, Callable[[float], bool]] = {
        "=": lambda v: v == want, "!=": lambda v: v != want, "<": lambda v: v < want,
        "<=": lambda v: v <= want, ">": lambda v: v > want, ">=": lambda v: v >= want,
    }
    test = compare[op]

    def predicate(r: Record) -> bool:
        v = get(r)
        return op == "!=" if v is None else test(v)
    return predicate


class _Parser:
    """expr := and (OR and)* ; and := unary ([AND] unary)* ; unary := NOT unary | ( expr ) | term"""

    def __init__(self, tokens: list[tuple[str, Any]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def _peek(self) -> tuple[str, Any] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expr(self) -> Predicate:
        parts = [self._and()]
        while self._peek() == ("keyword", "or"):
            self.pos += 1
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else (lambda r: any(p(r) for p in parts))

    def _and(self) -> Predicate:
        parts = [self._unary()]
        while (tok := self._peek()) is not None and tok not in (("keyword", "or"), ("paren", ")")):
            if tok == ("keyword", "and"):
                self.pos += 1
            parts.append(self._unary())
        return parts[0] if len(parts) == 1 else (lambda r: all(p(r) for p in parts))

    def _unary(self) -> Predicate:
        tok = self._peek()
        if tok is None:
            raise _usage("the expression ends where a term was expected")
        self.pos += 1
        kind, value = tok
        if tok == ("keyword", "not"):
            inner = self._unary()
            return lambda r: not inner(r)
        if tok == ("paren", "("):
            inner = self.expr()
            if self._peek() != ("paren", ")"):
                raise _usage("missing ')'")
            self.pos += 1
            return inner
        if kind == "term":
            return value
        raise _usage(f"unexpected {value!r}")
