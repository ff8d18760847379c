"""Is a graphed arm right, and how fast are arms? The checks a GPU run makes before it trusts CUDA graphs.

`check_graphed_matches_eager` steps an eager and a graphed arm from the same seed (every dilation's graph
replayed) and compares losses and weights; it never raises on a mismatch, so the caller can fall back to
eager steps. `measure_throughput` gives samples/s of one arm eager and graphed and of several arms at once.
"""
import functools
import itertools
from typing import Callable, Dict, List

import torch

from .fastloop import Arm, train_concurrently


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (the plain difference where b is zero)."""
    diff, ref = (a.double() - b.double()).norm().item(), b.double().norm().item()
    return diff / ref if ref > 0 else diff


def compare_arms(reference: Arm, candidate: Arm, steps: int = 3, rtol: float = 1e-3) -> Dict:
    """Step both arms `steps` times from the reference's weights; per-step loss and final weight/EMA relative
    errors, and whether all are within `rtol`. Never raises on a mismatch."""
    candidate.model.load_state_dict(reference.model.state_dict())
    candidate._ema.load_state_dict(reference._ema.state_dict())
    losses = {"reference": [], "candidate": []}
    for _ in range(steps):
        for name, arm in (("reference", reference), ("candidate", candidate)):
            arm.step()
            losses[name].append(arm.pop_losses())
    loss_err = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses["candidate"], losses["reference"])]
    weight_err = max(_rel_err(a, b) for a, b in zip(candidate.model.parameters(), reference.model.parameters()))
    ema_err = max(_rel_err(a, b) for a, b in zip(candidate.ema.parameters(), reference.ema.parameters()))
    worst = max([*loss_err, weight_err, ema_err])
    return {"passed": bool(worst <= rtol), "rtol": rtol, "steps": steps, "losses": losses,
            "loss_rel_err": max(loss_err), "weights_rel_err": weight_err, "ema_rel_err": ema_err}


def check_graphed_matches_eager(make_arm: Callable[[bool], Arm], steps: int = 3, rtol: float = 1e-3) -> Dict:
    """An eager and a graphed arm from `make_arm(graphed)` (same seed), `steps` steps each: per-step losses and
    final weights compared; "passed" also needs every graphed step to have been a replay. A warm-up or capture
    that fails (a host sync, say) is reported as a failure with its "error", so the caller can train eagerly."""
    eager, graphed = make_arm(False), make_arm(True)
    for arm in (eager, graphed):  # every dilation's graph replays at least once, in the same order for both
        order = itertools.cycle(arm.dilations)
        arm._draw_dilation = functools.partial(next, order)
    steps = max(steps, 2 * len(graphed.dilations))
    try:
        result = compare_arms(eager, graphed, steps, rtol)
    except RuntimeError as e:
        return {"passed": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                "graphs": sorted(graphed._graphs)}
    result["graphs"] = sorted(graphed._graphs)
    result["passed"] = result["passed"] and bool(graphed._graphs) and graphed.graph_error is None
    if graphed.graph_error is not None:
        result["error"] = graphed.graph_error
    return result


def measure_throughput(make_arm: Callable[[bool], Arm], arms: int = 4, steps: int = 50, untimed_steps: int = 5) -> Dict:
    """samples/s of one eager arm, one graphed arm and `arms` arms at once (eager and graphed; graphs on CUDA
    only); `untimed_steps` steps first take capture and first-step costs out of the timing."""
    def timed(group: List[Arm]) -> float:
        train_concurrently(group, untimed_steps)
        return train_concurrently(group, steps)["samples_per_s"]

    first = make_arm(False)
    out = {"arms": arms, "steps": steps, "one_eager": timed([first])}
    if first.cuda:
        out["one_graphed"] = timed([make_arm(True)])
    out["concurrent_eager"] = timed([make_arm(False) for _ in range(arms)])
    if first.cuda:
        out["concurrent_graphed"] = timed([make_arm(True) for _ in range(arms)])
    return out
