"""Post-hoc EMA, the math: which mix of stored power-EMA snapshots equals the EMA you want.

Karras et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2,
Sec. 3 and App. C) track power-function EMAs during training, whose weight on the iterate of
step ``tau`` at time ``t`` is the profile ``p(tau) = (g + 1) tau**g / t**(g + 1)`` on ``(0, t]``
(:class:`~d2ema.schedules.SigmaRel`, ``beta_t = (1 - 1/t)**(g + 1)``; with updates every ``U``
steps ``(1 - U/t)**(g + 1)``, which is the same profile over the weights seen every ``U``
steps). An EMA is linear in its profile, so a least-squares fit of the wanted profile by the
profiles of the snapshots, ``min_x || sum_i x_i p_i - p_target ||``, gives weights ``x`` with
``EMA_target ~= sum_i x_i snapshot_i``. The normal equations ``A x = b`` use closed-form inner
products and are solved in float64 (``cond(A)`` reaches 1e8 at 400 snapshots); ``x`` is then
scaled to sum 1, so a constant weight stays constant.

A target is a relative width ``sigma_rel`` (a power EMA), or a classic constant decay ``d``
(profile ``lambda exp(-lambda (t - tau))``, ``lambda = -ln d``), fitted directly, which is much
closer than a power EMA of the same width. Each :class:`Fit` reports how well the snapshots
represent the target (the relative misfit of the profiles), and :func:`check_fit` refuses a
target they cannot represent. Where this is derived and checked: ``shared/posthoc/notes.md``.

Example::

    fits = solve(times=[100, 200, 100, 200], gammas=[16.97, 16.97, 6.94, 6.94],
                 targets=[Target("sigma_rel", 0.07), Target("decay", 0.99)])
    for fit in fits:
        check_fit(fit)
        print(fit.describe())            # sigma_rel 0.07 at t=200: misfit 3.1%, ...
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Literal, TypeAlias

import torch

from d2ema.errors import D2EMAError
from d2ema.schedules import sigma_rel_to_gamma

Number: TypeAlias = float | torch.Tensor  # profile_dot broadcasts tensors

__all__ = [
    "MAX_SIGMA_REL",
    "Fit",
    "PostHocError",
    "Target",
    "check_fit",
    "gamma_to_sigma_rel",
    "profile_dot",
    "representable_range",
    "solve",
]

MAX_SIGMA_REL = 12**-0.5  # gamma = 0: the plain average of the whole run
MAX_RESIDUAL = 0.1  # refuse a reconstruction whose profile misses the target by more
MAX_INIT_SHARE = 0.01  # refuse a constant decay that still holds more of the initial weights
_F64 = torch.float64


class PostHocError(D2EMAError, ValueError):
    """Post-hoc EMA snapshots that cannot give what was asked; the message says what to do."""


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative width of the power profile with exponent ``gamma`` (inverse of
    :func:`~d2ema.schedules.sigma_rel_to_gamma`)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def profile_dot(t_a: Number, g_a: Number, t_b: Number, g_b: Number) -> torch.Tensor:
    """``<p_a, p_b>``: the L2 inner product of power profiles ending at ``t_a`` and ``t_b``.

    Both live on ``(0, min(t_a, t_b)]``; integrating gives
    ``(g_a + 1)(g_b + 1) / (g_a + g_b + 1) * (lo / hi)**g_hi / hi`` with ``lo <= hi`` the two
    end times and ``g_hi`` the exponent of the profile ending at ``hi`` (the power of a ratio
    <= 1 never overflows). Broadcasts; float64.
    """
    ta, ga, tb, gb = torch.broadcast_tensors(
        *(torch.as_tensor(v, dtype=_F64) for v in (t_a, g_a, t_b, g_b))
    )
    a_ends_later = ta >= tb
    hi = torch.where(a_ends_later, ta, tb)
    lo = torch.where(a_ends_later, tb, ta)
    g_hi = torch.where(a_ends_later, ga, gb)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * torch.exp(g_hi * torch.log(lo / hi)) / hi


@functools.lru_cache(maxsize=4)
def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of n-point Gauss-Legendre on [0, 1] (Golub-Welsch)."""
    k = torch.arange(1, n, dtype=_F64)
    off = k / torch.sqrt(4 * k * k - 1)
    nodes, vectors = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    return (nodes + 1) / 2, vectors[0] ** 2


def _exp_power_integral(gamma: float, a: float) -> float:
    """``int_0^1 (1 - v)**gamma exp(-a v) dv`` to float64 accuracy.

    The integrand falls from 1 on the scale ``1 / (gamma + a + 1)``; Gauss-Legendre on panels
    that double in width from a fraction of that scale resolves it for any ``gamma, a >= 0``.
    """
    h = 1.0 / (gamma + a + 1.0)
    edges = [0.0]
    width = h / 8
    while edges[-1] < 1.0:
        edges.append(min(1.0, edges[-1] + width))
        width *= 2
    lo = torch.tensor(edges[:-1], dtype=_F64)[:, None]
    span = torch.tensor(edges[1:], dtype=_F64)[:, None] - lo
    u, w = _gauss_legendre(20)
    v = lo + span * u
    f = torch.exp(gamma * torch.log1p(-v.clamp(max=1 - 1e-300)) - a * v)
    return float((f * w * span).sum())


@dataclasses.dataclass(frozen=True)
class Target:
    """An EMA to reconstruct: ``Target("sigma_rel", 0.05)`` or ``Target("decay", 0.999)``.

    ``sigma_rel`` is a power-function EMA (Karras et al.); ``decay`` a classic EMA with that
    constant decay per step, updated from step 1 on, as it stands at the target time.
    """

    kind: Literal["sigma_rel", "decay"]
    value: float

    def __post_init__(self) -> None:
        if self.kind == "sigma_rel":
            if not 0.0 < self.value < MAX_SIGMA_REL:
                raise PostHocError(
                    f"sigma_rel {self.value!r} is outside (0, {MAX_SIGMA_REL:.4f}): a power EMA "
                    "is at most the plain average of the whole run; e.g. 0.05"
                )
        elif self.kind == "decay":
            if not 0.0 < self.value < 1.0:
                raise PostHocError(f"decay {self.value!r} is outside (0, 1); e.g. 0.999")
        else:
            raise PostHocError(f"unknown target kind {self.kind!r}; use 'sigma_rel' or 'decay'")

    @property
    def label(self) -> str:
        return f"{self.kind} {self.value:g}"

    def sigma_rel_at(self, t: float) -> float:
        """The relative width of this target's profile at time ``t`` (a decay's depends on t:
        the standard deviation of its exponential lag truncated to ``(0, t]``, over ``t``)."""
        if self.kind == "sigma_rel":
            return self.value
        a = -math.log(self.value) * t
        if a < 1e-6:
            return MAX_SIGMA_REL
        var = 1.0 / a**2 - math.exp(-a) / (-math.expm1(-a)) ** 2
        return math.sqrt(max(var, 0.0))

    def init_share_at(self, t: float) -> float:
        """Weight the target still puts on the initial weights at time ``t`` (``d**t``)."""
        return self.value**t if self.kind == "decay" else 0.0


@dataclasses.dataclass(frozen=True)
class Fit:
    """How to mix the snapshots for one target, and how good the mix is.

    ``weights[i]`` belongs to the i-th snapshot given to :func:`solve` (0 for the ones after
    ``t``); they sum to 1. ``residual`` is ``||sum_i x_i p_i - p_target|| / ||p_target||``,
    the relative misfit of the profiles, which bounds the error relative to the data's scale;
    ``l1`` (``sum |x_i|``) is how much the rounding of the snapshots is amplified.
    """

    target: Target
    t: float
    weights: tuple[float, ...]
    residual: float
    l1: float
    cond: float
    used: int
    sigma_rel: float
    init_share: float

    def describe(self) -> str:
        text = (f"{self.target.label} at t={self.t:g}: profile misfit {self.residual:.2%}, "
                f"sum|x| {self.l1:.2f}, {self.used} snapshots, cond(A) {self.cond:.1e}")
        if self.target.kind == "decay":
            text += (f", ~sigma_rel {self.sigma_rel:.3f}, initial weights "
                     f"{self.init_share:.2%} of the target")
        return text


def _target_products(target: Target, s: torch.Tensor, g: torch.Tensor, t: float):
    """``b_i = <p_i, q>`` and ``||q||^2`` in time scaled so that the target time is 1."""
    if target.kind == "sigma_rel":
        gamma = sigma_rel_to_gamma(target.value)
        return profile_dot(s, g, 1.0, gamma), (gamma + 1) ** 2 / (2 * gamma + 1)
    lam = -math.log(target.value) * t  # rate per unit of scaled time
    b = torch.tensor(
        [
            (gi + 1) * lam * math.exp(-lam * (1 - si)) * _exp_power_integral(gi, lam * si)
            for si, gi in zip(s.tolist(), g.tolist())
        ],
        dtype=_F64,
    )
    return b, lam / 2 * -math.expm1(-2 * lam)


def _check_series(times: torch.Tensor, gammas: torch.Tensor) -> None:
    if times.numel() == 0:
        raise PostHocError("no snapshots to reconstruct from")
    if times.shape != gammas.shape or times.dim() != 1:
        raise PostHocError("times and gammas must be two lists of the same length")
    if not bool((times > 0).all()) or not bool(torch.isfinite(times).all()):
        raise PostHocError("snapshot times must be > 0 (time 1 is the first averaged step)")
    pairs = list(zip(times.tolist(), gammas.tolist()))
    if len(set(pairs)) != len(pairs):
        twice = sorted({p for p in pairs if pairs.count(p) > 1})[:3]
        raise PostHocError(
            f"the same snapshot (time, gamma) appears twice, e.g. {twice}: the fit would be "
            "singular; keep one of each (the snapshot index does this)"
        )


def solve(
    times: Sequence[float],
    gammas: Sequence[float],
    targets: Sequence[Target],
    at: float | None = None,
) -> list[Fit]:
    """Mixing weights of the snapshots ``(times[i], gammas[i])`` for each target at time ``at``.

    ``at`` (default: the last snapshot time) must be a snapshot time; snapshots after it are
    not used (they hold later weights). Times are in averaging steps: the EMA's step minus its
    ``start``; any unit works as long as it is the one the EMAs' ``beta`` used.
    """
    t_all = torch.as_tensor(times, dtype=_F64).reshape(-1)
    g_all = torch.as_tensor(gammas, dtype=_F64).reshape(-1)
    _check_series(t_all, g_all)
    at = float(t_all.max()) if at is None else float(at)
    if not bool((t_all == at).any()):
        later = t_all[t_all >= at]
        hint = f"; the next is {later.min():g}" if later.numel() else ""
        raise PostHocError(
            f"no snapshot at time {at:g}: an EMA can only be reconstructed where snapshots were "
            f"taken (the last before is {t_all[t_all < at].max():g}{hint})"
            if bool((t_all < at).any())
            else f"no snapshot at or before time {at:g}; the first is at {t_all.min():g}"
        )
    keep = t_all <= at
    s, g = t_all[keep] / at, g_all[keep]
    a = profile_dot(s[:, None], g[:, None], s[None, :], g[None, :])
    cond = float(torch.linalg.cond(a))
    fits = []
    for target in targets:
        b, q2 = _target_products(target, s, g, at)
        if cond < 1e13:
            x = torch.linalg.solve(a, b)
        else:  # e.g. thousands of snapshots: drop the directions the data cannot resolve
            x = torch.linalg.lstsq(a, b[:, None], rcond=1e-13, driver="gelsd").solution[:, 0]
        x = x / x.sum()
        misfit2 = max(q2 - 2 * float(x @ b) + float(x @ a @ x), 0.0)
        weights = torch.zeros_like(t_all)
        weights[keep] = x
        fits.append(Fit(
            target=target,
            t=at,
            weights=tuple(weights.tolist()),
            residual=math.sqrt(misfit2 / q2),
            l1=float(x.abs().sum()),
            cond=cond,
            used=int(keep.sum()),
            sigma_rel=target.sigma_rel_at(at),
            init_share=target.init_share_at(at),
        ))
    return fits


def representable_range(
    times: Sequence[float], gammas: Sequence[float], at: float | None = None,
    max_residual: float = MAX_RESIDUAL,
) -> tuple[float, float] | None:
    """The widest ``(lo, hi)`` sigma_rel range around the stored ones that the snapshots fit
    within ``max_residual`` (scanned on a grid of 48 widths), or None if none fits."""
    grid = [0.004 * (0.285 / 0.004) ** (i / 47) for i in range(48)]
    fits = solve(times, gammas, [Target("sigma_rel", s) for s in grid], at)
    ok = [f.residual <= max_residual for f in fits]
    if not any(ok):
        return None
    stored = min(range(len(grid)), key=lambda i: abs(grid[i] - gamma_to_sigma_rel(gammas[0])))
    if not ok[stored]:
        stored = ok.index(True)
    lo = hi = stored
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(grid) - 1 and ok[hi + 1]:
        hi += 1
    return grid[lo], grid[hi]


def check_fit(
    fit: Fit,
    max_residual: float = MAX_RESIDUAL,
    max_init_share: float = MAX_INIT_SHARE,
    representable: tuple[float, float] | None = None,
) -> None:
    """Raise :class:`PostHocError` if the snapshots cannot represent ``fit``'s target.

    ``representable`` (from :func:`representable_range`) makes the message name what they can.
    """
    span = (f"; these snapshots represent about sigma_rel {representable[0]:.3f} to "
            f"{representable[1]:.3f}" if representable else "")
    if fit.init_share > max_init_share:
        raise PostHocError(
            f"{fit.target.label} cannot be reconstructed at t={fit.t:g}: a classic EMA with this "
            f"decay still holds {fit.init_share:.1%} of the initial weights there "
            f"({fit.target.value:g}**{fit.t:g}), which power-EMA snapshots do not contain; ask "
            f"for a decay of at most {max_init_share ** (1 / fit.t):.5f}, or a sigma_rel{span}"
        )
    if fit.residual > max_residual:
        raise PostHocError(
            f"{fit.target.label} is outside what the snapshots can represent at t={fit.t:g}: the "
            f"best mix misses its profile by {fit.residual:.0%} (limit {max_residual:.0%}){span}"
            ". Choose a target in that range; or, for the next run, snapshot more often (a "
            "width below the shortest stored EMA needs snapshots every sigma_rel * T steps or "
            "closer) or track widths nearer the ones you want"
        )
