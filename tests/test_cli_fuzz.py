"""CLI fuzzing: generated safetensors files through inspect, inspect --json and convert.

Hypothesis builds whole files: LoRA-like modules (real SD1.5 module names and shapes,
and made-up ones) whose factors, alphas and DoRA scales get random dtypes (every
safetensors dtype), shapes (0-dim, 0-size, wrong) and values (NaN, ±Inf, 1e300, 0,
negatives), next to tensors with hostile names (surrogates, control characters, path
separators, odd and huge Unicode) and metadata with hostile strings. Each file goes
through the real CLI entry point (``loratool.cli.main.main``, in a forked child so that
one example cannot leak state into the next). Every run must end with an allowed exit
code, no traceback, only one-line ``error: `` messages, strict JSON where JSON is asked
for, and never the "this is a bug" line of the CLI boundary.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from loratool.arch import get_catalog
from loratool.cli.main import BUG_MARK, main
from loratool.io.safetensors import DTYPE_BITS

# A few real SD1.5 modules, small enough to keep each example fast.
REAL = [s for s in get_catalog("sd1") if s.kind in ("linear", "conv") and s.shape[0] <= 768 and s.shape[1] <= 768][:40:4]

HOSTILE = [
    "\ud800", "\udfff", "a\x00b", "\x1b[31mred\x1b]0;title\x07", "\u202eevil", "../../etc/passwd", "a/b\\c",
    "\n", "\r\n", "\t", "[/]", "[bold]x[/bold", "[link=http://example.invalid]a[/link]", "\U0010ffff", "\ufeff", "e\u0301" * 3, "\u0000", "x" * 5000, "", " ", ".", "__metadata__",
    "lora_unet_", "lora_te_text_model_encoder_layers_99_self_attn_q_proj", "😀" * 50,
]
SCALARS = [1.0, 4.0, 0.0, -2.0, 1e300, -1e300, math.nan, math.inf, -math.inf, 1e-45, 65504.0, 3.0e38]
PARAMS = ["lora_down.weight", "lora_up.weight", "alpha", "dora_scale", "lora_mid.weight", "hada_w1_a", "hada_w1_b",
          "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w2", "diff", "lora_A.weight", "lora_B.weight", "weight", "bias"]
FLOAT_FORMATS = {"F16": "<e", "F32": "<f", "F64": "<d"}
INT_FORMATS = {"I8": "<b", "U8": "<B", "I16": "<h", "U16": "<H", "I32": "<i", "U32": "<I", "I64": "<q", "U64": "<Q"}


def encode(dtype: str, count: int, value: float) -> bytes:
    """``count`` elements of ``value`` in ``dtype`` (its nearest representable form)."""
    if dtype in FLOAT_FORMATS or dtype == "BF16":
        fmt = FLOAT_FORMATS.get(dtype, "<f")
        try:
            one = struct.pack(fmt, value)
        except (OverflowError, struct.error):
            one = struct.pack(fmt, math.copysign(math.inf, value))
        return (one[2:] if dtype == "BF16" else one) * count  # BF16: the high half of an F32
    if dtype in INT_FORMATS:
        fmt = INT_FORMATS[dtype]
        lo, hi = (0, 2 ** (8 * struct.calcsize(fmt)) - 1) if fmt.isupper() or fmt[1].isupper() else (
            -(2 ** (8 * struct.calcsize(fmt) - 1)), 2 ** (8 * struct.calcsize(fmt) - 1) - 1)
        v = 0 if math.isnan(value) else int(max(lo, min(hi, value if math.isfinite(value) else math.copysign(hi, value))))
        return struct.pack(fmt, v) * count
    return bytes([0x3C if value else 0]) * ((count * DTYPE_BITS[dtype] + 7) // 8)  # BOOL, F8, sub-byte


def nbytes(dtype: str, shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * DTYPE_BITS[dtype] // 8


DTYPES = st.sampled_from(["F16", "F32", "BF16"] * 6 + sorted(DTYPE_BITS))
VALUES = st.sampled_from(SCALARS)
SMALL = st.sampled_from([0, 1, 2, 3, 4])


@st.composite
def real_module(draw: st.DrawFn) -> list[tuple[str, str, list[int], float]]:
    """One real module as kohya or PEFT-style keys: (key, dtype, shape, value) per tensor."""
    spec = draw(st.sampled_from(REAL))
    out, inp, *kernel = spec.shape
    rank = draw(st.sampled_from([1, 2, 1, 2, 0]))
    down = [rank, inp, *kernel]
    up = [out, rank, *([1, 1] if kernel else [])]
    if draw(st.booleans()):  # kohya names
        base = spec.kohya_name
        names = {"down": f"{base}.lora_down.weight", "up": f"{base}.lora_up.weight", "alpha": f"{base}.alpha",
                 "dora": f"{base}.dora_scale"}
    else:  # diffusers names
        base = f"{spec.component}.{spec.path}"
        names = {"down": f"{base}.lora_A.weight", "up": f"{base}.lora_B.weight", "alpha": f"{base}.alpha",
                 "dora": f"{base}.lora_magnitude_vector"}
    dtype = draw(st.sampled_from(["F16", "F32", "BF16"])) if draw(st.integers(0, 2)) else draw(DTYPES)
    tensors = [(names["down"], dtype, draw(st.sampled_from([down] * 5 + [[], [rank]])),
                draw(VALUES) if draw(st.integers(0, 5)) == 0 else 0.5),
               (names["up"], dtype, draw(st.sampled_from([up] * 4 + [[out, rank + 1], [], [0, rank]])), 0.25)]
    if draw(st.booleans()):
        tensors.append((names["alpha"], draw(DTYPES), draw(st.sampled_from([[], [], [1], [0], [2]])), draw(VALUES)))
    if draw(st.integers(0, 3)) == 0:
        dora = draw(st.sampled_from([[out, 1], [1, inp], [out], [], [out + 1, 1], [0]]))
        tensors.append((names["dora"], draw(DTYPES), dora, draw(VALUES)))
    return tensors


@st.composite
def odd_tensor(draw: st.DrawFn) -> tuple[str, str, list[int], float]:
    """A tensor with a made-up or hostile name, dtype, shape and value."""
    prefix = draw(st.sampled_from(["lora_unet_", "lora_te_", "lora_te1_", "unet.", "text_encoder.", "transformer.", ""]))
    middle = draw(st.sampled_from(HOSTILE) | st.text(max_size=12))
    name = f"{prefix}{middle}.{draw(st.sampled_from(PARAMS))}" if draw(st.booleans()) else middle
    shape = draw(st.lists(SMALL, max_size=4) | st.sampled_from([[1 << 40, 0], [0, (1 << 64) - 1], [3, 0, 2]]))
    return name, draw(DTYPES), shape, draw(VALUES)


@st.composite
def metadata(draw: st.DrawFn) -> dict[str, str]:
    text = st.sampled_from(HOSTILE) | st.text(max_size=20)
    meta = draw(st.dictionaries(text, text, max_size=3))
    for key in draw(st.lists(st.sampled_from(["ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                                              "modelspec.title", "modelspec.architecture", "ss_network_module",
                                              "lora_adapter_metadata", "sshs_model_hash"]), max_size=4)):
        meta[key] = draw(text | st.sampled_from(["nan", "1e300", "-4", "4", "sdxl_base_v1-0", "sd_1.5",
                                                 "networks.lora", "lycoris.kohya", "0" * 64,
                                                 '{"lora_alpha": NaN, "r": 4}', '{"unet.lora_alpha": 1e999}',
                                                 '{"lora_alpha": 8, "r": 4, "target_modules": ["to_q"]}', "{[}"]))
    return meta


@dataclass(frozen=True)
class LoraFile:
    """A generated file; shown as its header (the data is only long runs of the values)."""

    header: bytes
    data: bytes

    def __bytes__(self) -> bytes:
        return struct.pack("<Q", len(self.header)) + self.header + self.data

    def __repr__(self) -> str:
        return f"LoraFile(header={self.header!r}, data=<{len(self.data)} bytes>)"


@st.composite
def lora_file(draw: st.DrawFn) -> LoraFile:
    tensors: list[tuple[str, str, list[int], float]] = []
    for _ in range(draw(st.integers(0, 4))):
        tensors.extend(draw(real_module()))
    tensors.extend(draw(st.lists(odd_tensor(), max_size=3)))
    header: dict[str, Any] = {}
    meta = draw(metadata()) if draw(st.booleans()) else {}
    if meta:
        header["__metadata__"] = meta
    data, pos = [], 0
    for name, dtype, shape, value in tensors:
        if name in header or name == "__metadata__":
            continue
        size = nbytes(dtype, shape)
        if size > 1 << 22:  # a huge shape with no zero in it: keep the file small
            continue
        count = size * 8 // DTYPE_BITS[dtype]
        blob = encode(dtype, count, value)[:size].ljust(size, b"\0")
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
        data.append(blob)
        pos += size
    raw = json.dumps(header, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    return LoraFile(raw + b" " * (-len(raw) % 8), b"".join(data))


# -- running the CLI ----------------------------------------------------------------------

def run_in_child(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` in a forked child with its own stdout/stderr (UTF-8, as a terminal)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read)
        code, out, err = 99, io.TextIOWrapper(io.BytesIO(), "utf-8"), io.TextIOWrapper(io.BytesIO(), "utf-8", "backslashreplace")
        try:
            sys.stdout, sys.stderr = out, err
            try:
                main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:  # escaped main(): what a user would see as a traceback
                import traceback

                err.write("Traceback (most recent call last):\n" + "".join(traceback.format_exception(exc)))
                code = 98
            out.flush()
            err.flush()
            payload = pickle.dumps((code, out.buffer.getvalue(), err.buffer.getvalue()))  # type: ignore[attr-defined]
        except BaseException as exc:  # e.g. output that cannot be encoded
            payload = pickle.dumps((97, b"", f"Traceback (most recent call last):\n{exc!r}".encode()))
        with os.fdopen(write, "wb") as pipe:
            pipe.write(payload)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        code, out_bytes, err_bytes = pickle.loads(pipe.read())
    os.waitpid(pid, 0)
    return code, out_bytes.decode("utf-8", "replace"), err_bytes.decode("utf-8", "replace")


def strict_json(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def check_run(argv: list[str], code: int, out: str, err: str, allowed: set[int]) -> None:
    what = f"loratool {' '.join(argv)} -> exit {code}\nstdout: {out[-1500:]}\nstderr: {err[-1500:]}"
    assert "Traceback" not in out + err, what
    assert BUG_MARK not in err, what
    assert code in allowed, what
    lines = err.splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    listing = False
    for line in lines:
        listing = line.startswith("left out ") or (listing and line.startswith("  "))
        assert line.startswith(("error: ", "warning: ")) or listing, what
    assert len(errors) == (1 if code else 0), what
    if "--json" in argv:
        strict_json(out)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the files; also loads what the commands import, once, before forking."""
    import rich.table  # noqa: F401
    import torch  # noqa: F401

    import loratool.cli.convert_cmd  # noqa: F401
    import loratool.cli.inspect_cmd  # noqa: F401

    return tmp_path_factory.mktemp("fuzz")


# A fixed seed, a bounded number of examples (LORATOOL_FUZZ_EXAMPLES for a longer hunt), and
# no shrinking, so that a failure costs no more time than a pass; the failing file is shown.
@settings(max_examples=int(os.environ.get("LORATOOL_FUZZ_EXAMPLES", "200")), derandomize=True, deadline=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(blob=lora_file(), family=st.sampled_from([None, "sd1", "sd1", "sdxl"]), target=st.sampled_from(["kohya", "diffusers", "peft"]),
       dtype=st.sampled_from([None, None, "fp16", "bf16", "fp32"]), skip=st.booleans())
def test_generated_files_through_the_cli(scratch: Path, blob: LoraFile, family: str | None, target: str,
                                         dtype: str | None, skip: bool) -> None:
    path = scratch / "fuzz.safetensors"
    path.write_bytes(bytes(blob))
    for argv in (["inspect", str(path)], ["inspect", "--json", str(path)]):
        check_run(argv, *run_in_child(argv), allowed={0, 1})
    out = scratch / ("out" if target == "peft" else "out.safetensors")
    argv = ["convert", str(path), "--to", target, "-o", str(out), "--force",
            *(["--family", family] if family else []), *(["--dtype", dtype] if dtype else []),
            *(["--skip-unsupported"] if skip else [])]
    code, stdout, stderr = run_in_child(argv)
    check_run(argv, code, stdout, stderr, allowed={0, 1})
    if code == 0:  # what convert wrote is a valid file that loratool reads back
        argv = ["inspect", "--json", str(out)]
        check_run(argv, *run_in_child(argv), allowed={0})
