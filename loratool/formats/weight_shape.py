"""The base weight's out/in features implied by a module's adapter tensors (shapes only)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

Shapes = Mapping[str, tuple[int, ...]]


def _dim(shapes: Shapes, name: str, axis: int) -> int | None:
    shape = shapes.get(name)
    return shape[axis] if shape is not None and len(shape) > axis else None


def _lora(s: Shapes) -> tuple[int | None, int | None]:
    return _dim(s, "lora_up", 0), _dim(s, "lora_down", 1)


def _loha(s: Shapes) -> tuple[int | None, int | None]:
    if "hada_t1" in s:  # Tucker: w_a is [r, out], w_b is [r, in]
        return _dim(s, "hada_w1_a", 1), _dim(s, "hada_w1_b", 1)
    return _dim(s, "hada_w1_a", 0), _dim(s, "hada_w1_b", 1)


def _lokr(s: Shapes) -> tuple[int | None, int | None]:
    a = _dim(s, "lokr_w1", 0) or _dim(s, "lokr_w1_a", 0)
    c = _dim(s, "lokr_w1", 1) or _dim(s, "lokr_w1_b", 1)
    if "lokr_t2" in s:
        b, d = _dim(s, "lokr_w2_a", 1), _dim(s, "lokr_w2_b", 1)
    else:
        b = _dim(s, "lokr_w2", 0) or _dim(s, "lokr_w2_a", 0)
        d = _dim(s, "lokr_w2", 1) or _dim(s, "lokr_w2_b", 1)
    if None in (a, b, c, d):
        return None, None
    return a * b, c * d  # type: ignore[operator]


def _full(s: Shapes) -> tuple[int | None, int | None]:
    return _dim(s, "diff", 0), _dim(s, "diff", 1)


def _glora(s: Shapes) -> tuple[int | None, int | None]:
    return _dim(s, "b1", 0), _dim(s, "a1", 0)


def _oft(s: Shapes) -> tuple[int | None, int | None]:
    shape = s.get("oft_blocks")
    if shape is None or len(shape) < 3:
        return None, None
    return shape[-3] * shape[-1], None


def _first_dim(name: str) -> Callable[[Shapes], tuple[int | None, int | None]]:
    return lambda s: (_dim(s, name, 0), None)


WEIGHT_IO: dict[str, Callable[[Shapes], tuple[int | None, int | None]]] = {
    "lora": _lora,
    "locon": _lora,
    "loha": _loha,
    "lokr": _lokr,
    "full": _full,
    "glora": _glora,
    "oft": _oft,
    "boft": _oft,
    "norm": _first_dim("w_norm"),
    "ia3": lambda s: (None, None),
}


def weight_io(network_type: str | None, shapes: Shapes) -> tuple[int | None, int | None]:
    """(out_features, in_features) of the adapted weight; in may include a conv kernel."""
    fn = WEIGHT_IO.get(network_type or "")
    return fn(shapes) if fn else (None, None)
