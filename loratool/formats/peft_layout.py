"""PEFT's layout rules for one adapter: the ``adapter_config.json`` that reproduces each
module's rank and scale, and which LoKr/LoHa modules PEFT would build with other shapes.

PEFT derives factor shapes from the layer and a few settings (some of them adapter-wide),
so a LyCORIS file is only representable when its shapes agree with those rules.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from loratool.model import AdapterModule

# Network types a PEFT adapter holds, with PEFT's peft_type and alpha field.
PEFT_TYPES: dict[str, tuple[str, str]] = {
    "lora": ("LORA", "lora_alpha"),
    "locon": ("LORA", "lora_alpha"),
    "loha": ("LOHA", "alpha"),
    "lokr": ("LOKR", "alpha"),
}


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS/PEFT LoKr split of ``dimension`` into (m, n), m ≤ n, m·n = dimension, m
    closest to ``factor`` (−1: to √dimension), the rule PEFT builds its factors from."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def lokr_mismatch(m: AdapterModule) -> str | None:
    """Why PEFT's LoKrModel (``decompose_factor=-1``) would build other factor shapes.

    PEFT derives each factor's shape from the layer (``factorization(out)``,
    ``factorization(in)``, smaller factor in W1) and decides full vs low-rank from ``r``:
    W2 is low-rank iff r < max(W2 dims)/2, W1 iff ``decompose_both`` and r < max(W1 dims)/2.
    """
    shape = m.extra.get("shape")
    s = {k: v.shape for k, v in m.params.items()}
    if not shape or len(shape) < 2:
        return None
    w1 = s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
    (out_l, out_k), (in_m, in_n) = factorization(shape[0]), factorization(shape[1])
    if tuple(w1[:2]) != (out_l, in_m):
        return "LoKr factor split differs from PEFT's (PEFT derives it from the layer, smaller factor in W1)"
    r = m.rank or _full_rank(m)
    w2_low = "lokr_w2" not in s
    if w2_low != (r < max(out_k, in_n) / 2):
        return f"LoKr {'low-rank' if w2_low else 'full'} W2 where PEFT's rank rule (r < max(W2 dims)/2) builds the other"
    if "lokr_w1_a" in s and not r < max(out_l, in_m) / 2:
        return "LoKr low-rank W1 where PEFT's rank rule (r < max(W1 dims)/2) builds it full"
    return None


# PEFT LoHa/LoKr settings that hold for a whole adapter: (type, flag, says-yes, needs-it).
# ``needs-it`` tells whether a module agrees only if the flag is on (None: indifferent).
def _lokr_w1_needs_decompose(m: AdapterModule) -> bool | None:
    if "lokr_w1_a" in m.params:
        return True
    shape = m.extra.get("shape")
    if not shape or len(shape) < 2:
        return None
    r = m.rank or _full_rank(m)
    w1 = m.params["lokr_w1"].shape
    # full W1 stays full under decompose_both only when r >= max(W1 dims)/2
    return None if r >= max(w1[0], w1[1]) / 2 else False


def _tucker_needs_effective_conv(tucker_param: str) -> Callable[[AdapterModule], bool | None]:
    def needs(m: AdapterModule) -> bool | None:
        shape = m.extra.get("shape")
        if not shape or len(shape) != 4 or tuple(shape[2:]) == (1, 1):
            return None  # PEFT applies the flag to convs with a kernel only
        return tucker_param in m.params

    return needs


ADAPTER_WIDE_FLAGS: list[tuple[str, str, Callable[[AdapterModule], bool | None]]] = [
    ("lokr", "decompose_both", _lokr_w1_needs_decompose),
    ("lokr", "use_effective_conv2d", _tucker_needs_effective_conv("lokr_t2")),
    ("loha", "use_effective_conv2d", _tucker_needs_effective_conv("hada_t1")),
]


def peft_adapter_conflicts(modules: list[AdapterModule]) -> dict[str, str]:
    """Modules PEFT would build differently because a LoHa/LoKr setting is adapter-wide.

    Per component and flag, the setting that fits more modules wins; the others are
    returned as ``{module: reason}`` (PEFT would refuse their shapes on load)."""
    refused: dict[str, str] = {}
    for component, mods in components(modules).items():
        kinds = Counter(PEFT_TYPES[m.network_type][0] for m in mods)
        if len(kinds) > 1:  # one PEFT adapter has one type: the most common one stays
            kept = kinds.most_common(1)[0][0]
            for m in mods:
                if PEFT_TYPES[m.network_type][0] != kept:
                    refused[m.source_name or str(m.key)] = (
                        f"one PEFT adapter holds one type; {component} is mostly {kept}, this module is "
                        f"{PEFT_TYPES[m.network_type][0]}"
                    )
            mods = [m for m in mods if PEFT_TYPES[m.network_type][0] == kept]
        for ntype, flag, needs in ADAPTER_WIDE_FLAGS:
            votes = [(m, needs(m)) for m in mods if m.network_type == ntype]
            yes = [m for m, v in votes if v is True]
            no = [m for m, v in votes if v is False]
            if yes and no:
                losers, setting = (no, True) if len(yes) >= len(no) else (yes, False)
                for m in losers:
                    refused[m.source_name or str(m.key)] = (
                        f"PEFT's {flag} is one setting for all of {component}; it must be {setting} "
                        f"for most {ntype.upper()} modules there, which builds this one differently"
                    )
    return refused


def components(modules: list[AdapterModule]) -> dict[str, list[AdapterModule]]:
    out: dict[str, list[AdapterModule]] = {}
    for m in modules:
        out.setdefault(m.key.component, []).append(m)
    return out


def peft_config(modules: list[AdapterModule], base_model: str | None = None) -> dict[str, Any]:
    """An adapter_config.json for one component: defaults = most common rank/alpha,
    ``^``-anchored ``rank_pattern``/``alpha_pattern`` entries for the rest, exact targets."""
    ntypes = {PEFT_TYPES[m.network_type][0] for m in modules}
    if len(ntypes) != 1:
        raise ValueError(f"one PEFT adapter cannot mix {sorted(ntypes)}")
    peft_type = ntypes.pop()
    alpha_field = "lora_alpha" if peft_type == "LORA" else "alpha"
    ranks = {m.key.path: m.rank or _full_rank(m) for m in modules}
    alphas = {m.key.path: _peft_alpha(m) for m in modules}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config: dict[str, Any] = {
        "peft_type": peft_type,
        "r": r,
        alpha_field: alpha,
        "rank_pattern": {f"^{p}": v for p, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{p}": v for p, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "task_type": None,
        "revision": None,
    }
    if peft_type == "LORA":
        config.update(
            use_dora=any(m.dora for m in modules), use_rslora=False, lora_dropout=0.0, bias="none",
            lora_bias=any("lora_up_bias" in m.params for m in modules), fan_in_fan_out=False,
            init_lora_weights=True,
        )
    else:
        config.update(rank_dropout=0.0, module_dropout=0.0, init_weights=True)
        if peft_type == "LOKR":
            config.update(decompose_factor=-1)
        config.update({flag: any(needs(m) for m in modules) for t, flag, needs in ADAPTER_WIDE_FLAGS if t == peft_type.lower()})
    return config


def _full_rank(m: AdapterModule) -> int:
    """A PEFT LoKr rank large enough that PEFT keeps both factors full."""
    shapes = [ref.shape for ref in m.params.values()]
    return max(max(s) for s in shapes if s)


def _peft_alpha(m: AdapterModule) -> float:
    if m.network_type == "lokr" and m.rank is None:
        # Both factors full: kohya/LyCORIS ignore the stored alpha (scale 1) but PEFT
        # always scales by alpha/r, so alpha = r·scale for the r written for this module.
        return float(_full_rank(m)) * m.scale
    alpha = m.effective_alpha
    return float(alpha) if alpha is not None else float(_full_rank(m))
