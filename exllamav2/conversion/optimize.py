"""Pick one measured candidate per module so the layers meet a bits-per-weight target.

Minimises the summed error (1 - accuracy) under the bit budget: start from every module's cheapest
candidate, then repeatedly take the upgrade with the most error removed per extra bit that still
fits, until none does.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def choose(measurement: dict[str, list[dict]], numel: dict[str, int], bpw: float) -> dict[str, dict]:
    """measurement: {module: [records with accuracy, total_bits]}; numel: weights per module.
    Returns the chosen record per module."""
    missing = [k for k in numel if k not in measurement]
    if missing:
        raise ValueError(
            f"the measurement has no entry for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
            f"it was made for another model: measure again (drop -m)"
        )
    options = {k: sorted(measurement[k], key=lambda r: (r["total_bits"], -r["accuracy"])) for k in numel}
    budget = bpw * sum(numel.values())
    cur = {k: 0 for k in options}
    spent = sum(o[0]["total_bits"] for o in options.values())
    if spent > budget:
        log.warning("target %.3f bpw is below the cheapest layout (%.3f bpw); using the cheapest",
                    bpw, spent / sum(numel.values()))

    def err(record: dict) -> float:
        return 1.0 - record["accuracy"]

    while True:
        best = None
        for k, opts in options.items():
            now = opts[cur[k]]
            for j, o in enumerate(opts):
                gain = err(now) - err(o)
                extra = o["total_bits"] - now["total_bits"]
                if gain <= 0 or spent + extra > budget:
                    continue
                ratio = float("inf") if extra <= 0 else gain / extra
                if best is None or ratio > best[0]:
                    best = (ratio, k, j, extra)
        if best is None:
            break
        _, k, j, extra = best
        cur[k] = j
        spent += extra

    chosen = {k: options[k][cur[k]] for k in options}
    log.info("layers: %.4f bpw chosen for a target of %.4f (summed error %.5f)", spent / sum(numel.values()),
             bpw, sum(err(r) for r in chosen.values()))
    return chosen
