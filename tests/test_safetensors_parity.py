"""loratool's header parser accepts exactly what the reference ``safetensors`` library
(the installed Rust one, ``safe_open``) accepts, on crafted and generated headers.

The oracle is the library itself, never loratool. Where both accept, they must also agree
on the tensor names, dtypes, shapes and metadata. Deliberate differences, each checked
separately below rather than hidden:

* ``parse_header_bytes`` describes a file whose data is cut short (``complete`` is
  False) so that a broken download can still be surveyed; ``read_header``, which every
  reader uses, refuses it as the library does.
* more than ``MAX_TENSORS`` tensors are refused before parsing, to bound memory (no real
  checkpoint comes near a million tensors).
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from loratool.errors import InputError
from loratool.io import safetensors as st_io
from loratool.io.safetensors import DTYPE_BITS, parse_header_bytes, read_header
from tests.conftest import FIXTURES, REALWORLD

U64 = 1 << 64


def reference(path: Path) -> dict[str, Any] | None:
    """What the reference library reads from ``path``; None when it refuses the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with safe_open(str(path), "pt") as f:
                tensors = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
                return {"tensors": tensors, "metadata": f.metadata() or {}}
    except Exception:  # the library raises SafetensorError, and a few others on odd input
        return None


def ours(path: Path) -> dict[str, Any] | None:
    try:
        header = read_header(path)
    except InputError:
        return None
    return {"tensors": {k: (t.dtype, list(t.shape)) for k, t in header.tensors.items()}, "metadata": header.metadata}


def write(path: Path, header: bytes | str, data: int = 0, *, length: int | None = None) -> Path:
    """The header, then ``data`` zero bytes (a sparse file: no disk used)."""
    raw = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw) if length is None else length) + raw)
        fh.truncate(8 + len(raw) + data)
    return path


def assert_agree(path: Path) -> None:
    theirs = reference(path)
    mine = ours(path)
    assert (mine is not None) == (theirs is not None), (
        f"safetensors {'accepts' if theirs is not None else 'refuses'} it, loratool "
        f"{'accepts' if mine is not None else 'refuses'} it: {path.read_bytes()[:300]!r}")
    if theirs is not None:
        assert mine == theirs


def entry(dtype: str = "F32", shape: list[int] | None = None, begin: int = 0, end: int | None = None, extra: str = "") -> str:
    shape = [1] if shape is None else shape
    if end is None:
        n = 1
        for d in shape:
            n *= d
        end = begin + n * DTYPE_BITS.get(dtype, 32) // 8
    return f'{{"dtype":"{dtype}","shape":{json.dumps(shape)},"data_offsets":[{begin},{end}]{extra}}}'


def one(tensor: str) -> str:
    """A header holding one tensor named "a"."""
    return '{"a":' + tensor + "}"


A, B = entry(), entry(begin=4)
NESTED_ARRAYS = '[' * 125 + ']' * 125  # with the root and the entry: 127 levels, the most serde_json takes
# name -> (header, data bytes); crafted one by one after reading the library's rules.
CASES: dict[str, tuple[str | bytes, int]] = {
    "plain": (f'{{"a":{A},"b":{B}}}', 8),
    "empty": ("{}", 0),
    "empty with trailing data": ("{}", 4),
    "metadata only": ('{"__metadata__":{"k":"v"}}', 0),
    "metadata null": (f'{{"__metadata__":null,"a":{A}}}', 4),
    "metadata int value": (f'{{"__metadata__":{{"k":1}},"a":{A}}}', 4),
    "metadata nested value": (f'{{"__metadata__":{{"k":{{"x":"y"}}}},"a":{A}}}', 4),
    "metadata list": (f'{{"__metadata__":["k"],"a":{A}}}', 4),
    "metadata twice": (f'{{"__metadata__":{{"k":"1"}},"__metadata__":{{"k":"2"}},"a":{A}}}', 4),
    "metadata key twice": (f'{{"__metadata__":{{"k":"1","k":"2"}},"a":{A}}}', 4),
    "metadata key twice, first not a string": (f'{{"__metadata__":{{"k":1,"k":"2"}},"a":{A}}}', 4),
    "metadata key twice, last not a string": (f'{{"__metadata__":{{"k":"1","k":2}},"a":{A}}}', 4),
    "metadata shaped like an entry, strings": (f'{{"__metadata__":{{"dtype":"F32","shape":"1","data_offsets":"x"}},"a":{A}}}', 4),
    "metadata shaped like an entry": (f'{{"__metadata__":{A},"a":{A}}}', 4),
    "tensor twice, same entry": (f'{{"a":{A},"a":{A}}}', 4),
    "tensor twice, last leaves a gap": (f'{{"a":{A},"a":{B}}}', 8),
    "tensor twice, first leaves a gap": (f'{{"a":{B},"a":{A}}}', 8),
    "tensor twice, first invalid": (f'{{"a":{entry("F33")},"a":{A}}}', 4),
    "tensor twice, first not an object": (f'{{"a":1,"a":{A}}}', 4),
    "field twice": ('{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4),
    "missing shape": ('{"a":{"dtype":"F32","data_offsets":[0,4]}}', 4),
    "missing dtype": ('{"a":{"shape":[1],"data_offsets":[0,4]}}', 4),
    "fields reordered": ('{"a":{"data_offsets":[0,4],"shape":[1],"dtype":"F32"}}', 4),
    "extra field": (one(entry(extra=',"x":[1,{"y":null},true]')), 4),
    "extra field named like a field": (one(entry(extra=',"x":{"dtype":[1]}')), 4),
    "extra field 127 deep": (one(entry(extra=',"x":' + NESTED_ARRAYS)), 4),
    "extra field 128 deep": (one(entry(extra=',"x":[' + NESTED_ARRAYS + "]")), 4),
    "extra objects 128 deep": (one(entry(extra=',"x":' + '{"y":' * 126 + "1" + "}" * 126)), 4),
    "extra field 5000 deep": (one(entry(extra=',"x":' + "[" * 5000 + "]" * 5000)), 4),
    "nested 100000 deep": ('{"a":' + '[' * 100_000 + ']' * 100_000 + '}', 0),
    "extra NaN": (one(entry(extra=',"x":NaN')), 4),
    "extra Infinity": (one(entry(extra=',"x":-Infinity')), 4),
    "extra 1e400": (one(entry(extra=',"x":1e400')), 4),
    "extra 1e-400": (one(entry(extra=',"x":1e-400')), 4),
    "extra 400-digit integer": (one(entry(extra=',"x":' + "9" * 400)), 4),
    "extra 30-digit integer": (one(entry(extra=',"x":-' + "9" * 30)), 4),
    "extra -0": (one(entry(extra=',"x":-0')), 4),
    "shape -0": ('{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', 0),
    "shape float": ('{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', 4),
    "shape exponent": ('{"a":{"dtype":"F32","shape":[1e0],"data_offsets":[0,4]}}', 4),
    "shape negative": ('{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', 4),
    "shape string": ('{"a":{"dtype":"F32","shape":["1"],"data_offsets":[0,4]}}', 4),
    "shape empty (scalar)": ('{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}', 4),
    "shape 2**64 beside 0": (f'{{"a":{entry(shape=[U64, 0])}}}', 0),
    "shape 2**64-1 beside 0": (f'{{"a":{entry(shape=[U64 - 1, 0])}}}', 0),
    "shape 0 before 2**64-1": (f'{{"a":{entry(shape=[0, U64 - 1])}}}', 0),
    "shape 2**32 x 2**32 then 0": (f'{{"a":{entry(shape=[1 << 32, 1 << 32, 0])}}}', 0),
    "shape overflowing bytes": (f'{{"a":{entry(shape=[1 << 62], end=0)}}}', 0),
    "shape 2**63 beside 0": (f'{{"a":{entry(shape=[1 << 63, 0])}}}', 0),
    "offsets reversed": ('{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}', 4),
    "offsets three": ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,4]}}', 4),
    "offsets negative": ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}}', 4),
    "offsets 2**64": (f'{{"a":{entry(shape=[0], begin=U64, end=U64)}}}', 0),
    "offsets 2**64-1": (f'{{"a":{entry(shape=[0], begin=U64 - 1, end=U64 - 1)}}}', 0),
    "gap at the start": (f'{{"a":{entry(begin=4)}}}', 8),
    "gap between": (f'{{"a":{A},"b":{entry(begin=8)}}}', 12),
    "overlap": (f'{{"a":{entry(shape=[2])},"b":{entry(begin=4, shape=[2])}}}', 12),
    "span mismatch": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,12]}}', 12),
    "trailing data": (f'{{"a":{A}}}', 5),
    "truncated data": (f'{{"a":{A},"b":{B}}}', 6),
    "unaligned offsets": (f'{{"a":{entry("U8", [2])},"b":{entry("F32", begin=2)}}}', 6),
    "zero-size in the middle": (f'{{"a":{A},"z":{entry(shape=[0], begin=4)},"b":{B}}}', 8),
    "zero-size past the end": (f'{{"a":{A},"z":{entry(shape=[0], begin=8)}}}', 4),
    "zero-size overlapping": (f'{{"a":{entry(shape=[2])},"z":{entry(shape=[0], begin=4)}}}', 8),
    "unknown dtype": (f'{{"a":{entry("F33", end=4)}}}', 4),
    "lowercase dtype": (f'{{"a":{entry("f32", end=4)}}}', 4),
    "dtype not a string": ('{"a":{"dtype":32,"shape":[1],"data_offsets":[0,4]}}', 4),
    "F4 odd count": (f'{{"a":{entry("F4", [3], end=2)}}}', 2),
    "F4 even count": (f'{{"a":{entry("F4", [4])}}}', 2),
    "F6 in whole bytes": (f'{{"a":{entry("F6_E2M3", [4])}}}', 3),
    "F6 not whole bytes": (f'{{"a":{entry("F6_E3M2", [2], end=2)}}}', 2),
    "padding spaces": (f'{{"a":{A}}}      ', 4),
    "padding whitespace mix": (f' \t\r\n{{"a":{A}}}\n\t ', 4),
    "padding NUL": (f'{{"a":{A}}}\x00\x00', 4),
    "BOM": (f'\ufeff{{"a":{A}}}', 4),
    "invalid UTF-8": (b'{"a\xff":' + A.encode() + b"}", 4),
    "surrogate pair escaped": (f'{{"a\\ud83d\\ude00":{A}}}', 4),
    "UTF-8 name": (f'{{"a\u00e9\U0001f600":{A}}}', 4),
    "lone surrogate in a name": (f'{{"a\\ud800":{A}}}', 4),
    "lone low surrogate in a name": (f'{{"a\\udc00":{A}}}', 4),
    "lone surrogate in metadata": (f'{{"__metadata__":{{"k":"\\ud800"}},"a":{A}}}', 4),
    "lone surrogate in an extra field": (one(entry(extra=',"x":["\\udbff"]')), 4),
    "escaped backslash then u": (f'{{"a\\\\ud800":{A}}}', 4),
    "raw control character": (f'{{"a\x01":{A}}}', 4),
    "escaped control character": (f'{{"a\\u0001\\n":{A}}}', 4),
    "trailing comma": (f'{{"a":{A},}}', 4),
    "single quotes": (f"{{'a':{A}}}", 4),
    "root is a list": (f"[{A}]", 4),
    "root is a string": ('"a"', 0),
    "entry is a string": ('{"a":"F32"}', 0),
    "tensors named like fields": (f'{{"dtype":{A},"shape":{B},"data_offsets":{entry(begin=8)}}}', 12),
    "root shaped like an entry": ('{"dtype":"F32","shape":[1],"data_offsets":[0,4]}', 4),
    "empty name": (f'{{"":{A}}}', 4),
    "header of spaces": ("        ", 0),
    "empty header": ("", 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_header(tmp_path: Path, case: str) -> None:
    header, data = CASES[case]
    assert_agree(write(tmp_path / "x.safetensors", header, data))


@pytest.mark.parametrize("dtype", sorted(DTYPE_BITS))
def test_every_dtype(tmp_path: Path, dtype: str) -> None:
    shape = [2, 4]
    assert_agree(write(tmp_path / "x.safetensors", f'{{"a":{entry(dtype, shape)}}}', 8 * DTYPE_BITS[dtype] // 8))


@pytest.mark.parametrize(("name", "length", "size"), [
    ("file of 7 bytes", None, 7), ("header length 0", 0, 16), ("header length beyond the file", 1000, 64),
    ("header length above 100 MB", 100_000_001, 64), ("header length 2**64-1", U64 - 1, 64),
])
def test_header_length(tmp_path: Path, name: str, length: int | None, size: int) -> None:
    path = tmp_path / "x.safetensors"
    if length is None:
        path.write_bytes(b"{}" + bytes(size - 2))
    else:
        path.write_bytes(struct.pack("<Q", length) + b"{}" + b" " * (size - 10))
    assert_agree(path)


def test_real_files_agree(tmp_path: Path) -> None:
    files = sorted(FIXTURES.rglob("*.safetensors"))
    if REALWORLD.is_dir():
        files += sorted(REALWORLD.rglob("*.safetensors"))
    assert len(files) >= 13
    for path in files:
        assert reference(path) is not None, path
        assert_agree(path)


# -- generated headers --------------------------------------------------------------------

DTYPES = st.sampled_from([*DTYPE_BITS] * 4 + ["F33", "f16"])
def mostly(valid: Any, *wrong: Any, odds: int = 12) -> st.SearchStrategy[Any]:
    """``valid`` most of the time, else one of ``wrong``."""
    return st.sampled_from([valid] * odds + list(wrong))


@st.composite
def headers(draw: st.DrawFn) -> tuple[str, int]:
    """A header of random tensors, laid out right or wrong in random ways, and a data size."""
    n = draw(st.integers(0, 5))
    pos, parts = 0, []
    for i in range(n):
        dtype = draw(DTYPES)
        shape = draw(st.lists(mostly(2, 0, 1, 3, 5, U64 - 1, U64, 1 << 31, odds=4), max_size=3))
        count = 1
        for d in shape:
            count *= d
        size = count * DTYPE_BITS.get(dtype, 8) // 8 if count <= (1 << 31) else 0  # ≤ 16 GiB, sparse
        begin = pos + draw(mostly(0, 1, -1, 4, odds=40))
        end = begin + size + draw(mostly(0, 1, -1, odds=40))
        pos = max(pos, end)
        name = draw(mostly(f"t{i}", "t0", "__metadata__", "dtype", "a\\ud800", "a\\ud83d\\ude00", "\u00e9", "", odds=40))
        extra = draw(mostly("", ',"x":1', ',"dtype":"F32"', ',"x":[[[]]]', ',"x":NaN', ',"x":1e999', ',"x":-0', odds=30))
        fields = [f'"dtype":{json.dumps(dtype)}', f'"shape":{json.dumps(shape)}', f'"data_offsets":[{begin},{end}]']
        if draw(st.booleans()):
            fields = draw(st.permutations(fields))
        parts.append(f'"{name}":{{{",".join(fields)}{extra}}}')
    if draw(st.booleans()):
        meta = draw(mostly('{"k":"v"}', "null", '{"k":1}', '{"k":"v","k":"w"}', '{"k":"\\udc00"}', "[]", odds=6))
        parts.insert(draw(st.integers(0, len(parts))), f'"__metadata__":{meta}')
    header = "{" + ",".join(parts) + "}" + " " * draw(st.integers(0, 7))
    return header, max(0, pos + draw(mostly(0, 1, -1, odds=30)))


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=headers())
def test_generated_headers(tmp_path: Path, case: tuple[str, int]) -> None:
    header, data = case
    assert_agree(write(tmp_path / "x.safetensors", header, data))


# -- the deliberate differences -----------------------------------------------------------

def test_truncated_data_is_described_but_not_read(tmp_path: Path) -> None:
    path = write(tmp_path / "x.safetensors", f'{{"a":{A},"b":{B}}}', 6)
    assert reference(path) is None and ours(path) is None  # what every reader sees
    raw = path.read_bytes()
    header = parse_header_bytes(path, raw, len(raw))  # what a survey of a broken download sees
    assert not header.complete and sorted(header.tensors) == ["a", "b"]


def test_tensor_count_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = ",".join(f'"t{i}":{entry(shape=[0], begin=0, end=0)}' for i in range(11))
    path = write(tmp_path / "x.safetensors", "{" + entries + "}")
    assert reference(path) is not None and ours(path) is not None
    monkeypatch.setattr(st_io, "MAX_TENSORS", 10)
    with pytest.raises(InputError, match="more than 10 tensors"):
        read_header(path)
