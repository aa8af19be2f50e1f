"""Score calibration and threshold transfer for the cancer classifier (pure NumPy; no label of a query is read).

A threshold is chosen on validation sections and applied to new ones. How a validation threshold *transfers*
is the ``strategy``:

``'platt'``
    Platt scaling ``σ(a · logit + b)`` fitted on the pooled validation logits; one threshold for every section.
``'section'``
    Each section's logits are first standardised with that section's own median and MAD (label-free), then
    Platt-scaled: removes section-level offsets of the logit scale.
``'prior'``
    Platt scaling, then a prior-shift correction per section (Saerens, Latinne & Decaestecker 2002): the
    section's tumour fraction is estimated by EM from its own calibrated scores, within the range of tumour
    fractions of the validation sections, and the posteriors are re-weighted from the validation prior to it.
``'quantile'``
    SpaCancer's transfer: every section calls the same *fraction* of its spots tumour as the validation
    threshold called on the pooled validation spots (assumes every section has the validation tumour fraction).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

__all__ = ["STRATEGIES", "Calibration", "best_threshold", "expected_calibration_error"]

STRATEGIES = ("platt", "section", "prior", "quantile")
Strategy = Literal["platt", "section", "prior", "quantile"]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def _groups(n: int, groups: np.ndarray | None) -> np.ndarray:
    return np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)


def standardise_by_section(logits: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """``(logit − median) / (1.4826 · MAD)`` within each section (std when the MAD is 0; unchanged below 2 spots)."""
    out = np.asarray(logits, dtype=np.float64).copy()
    g = _groups(out.size, groups)
    for s in np.unique(g):
        m = g == s
        if m.sum() < 2:
            continue
        v = out[m]
        med = np.median(v)
        spread = 1.4826 * np.median(np.abs(v - med))
        if spread < 1e-8:
            spread = v.std()
        out[m] = (v - med) / (spread if spread > 1e-8 else 1.0)
    return out


def prior_shift(
    p: np.ndarray, train_prior: float, *, bounds: tuple[float, float] = (1e-3, 1 - 1e-3), max_iter: int = 200,
    tol: float = 1e-6,
) -> tuple[np.ndarray, float]:
    """Saerens EM: posteriors under ``train_prior`` → posteriors under the section's own estimated prior.

    The estimate is kept within ``bounds``: EM on miscalibrated scores can run to a prior of 0 or 1 (every spot
    called one class), so :class:`Calibration` bounds it by the tumour fractions of the validation sections.
    """
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    t = float(np.clip(train_prior, 1e-3, 1 - 1e-3))
    lo, hi = max(float(bounds[0]), 1e-3), min(float(bounds[1]), 1 - 1e-3)
    q = float(np.clip(t, lo, hi))
    for _ in range(max_iter):
        w1, w0 = q / t, (1 - q) / (1 - t)
        adj = w1 * p / (w1 * p + w0 * (1 - p))
        new = float(np.clip(adj.mean(), lo, hi))
        done = abs(new - q) < tol
        q = new
        if done:
            break
    w1, w0 = q / t, (1 - q) / (1 - t)
    return w1 * p / (w1 * p + w0 * (1 - p)), q


def best_threshold(p: np.ndarray, y: np.ndarray, criterion: Literal["f1", "youden"] = "f1") -> tuple[float, float]:
    """Threshold on ``p`` maximising ``criterion`` on labels ``y`` (midway to the next lower score); (t, value)."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y).astype(int)
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    tp = np.cumsum(ys == 1)
    fp = np.cumsum(ys == 0)
    last = np.r_[ps[1:] != ps[:-1], True]  # a cut keeps every spot tied with the last one called
    tp, fp, cut = tp[last], fp[last], ps[last]
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    fn, tn = n_pos - tp, n_neg - fp
    if criterion == "f1":
        val = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    elif criterion == "youden":
        val = tp / max(n_pos, 1) + tn / max(n_neg, 1) - 1
    else:
        msg = f"Expected `criterion` to be 'f1' or 'youden', found {criterion!r}."
        raise ValueError(msg)
    i = int(np.argmax(val))
    t = float(cut[i])
    lower = cut[i + 1] if i + 1 < cut.size else None
    return (float((t + lower) / 2) if lower is not None else t), float(val[i])


def expected_calibration_error(p: np.ndarray, y: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error: Σ_bins (n_bin / n) · |mean score − tumour fraction| over equal-width bins."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if p.size == 0:
        return float("nan")
    b = np.minimum((p * n_bins).astype(int), n_bins - 1)
    err = 0.0
    for k in range(n_bins):
        m = b == k
        if m.any():
            err += m.sum() / p.size * abs(p[m].mean() - y[m].mean())
    return float(err)


class Calibration:
    """A fitted calibration + threshold; :meth:`apply` maps logits of any sections to scores to threshold.

    Stored in a model as :meth:`to_dict` (plain JSON), rebuilt with :meth:`from_dict`.
    """

    def __init__(self, strategy: Strategy = "platt", a: float = 1.0, b: float = 0.0, train_prior: float = 0.5,
                 threshold: float = 0.5, fraction: float = 0.5, method: str = "platt",
                 prior_range: tuple[float, float] = (1e-3, 1 - 1e-3)) -> None:  # fmt: skip
        if strategy not in STRATEGIES:
            msg = f"Expected the threshold transfer to be one of {list(STRATEGIES)}, found {strategy!r}."
            raise ValueError(msg)
        self.strategy, self.a, self.b = strategy, float(a), float(b)
        self.prior_range = (float(prior_range[0]), float(prior_range[1]))
        self.train_prior, self.threshold, self.fraction, self.method = float(train_prior), float(threshold), float(fraction), method

    # -- fitting ---------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, logits: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None, *,
            strategy: Strategy = "platt", criterion: Literal["f1", "youden"] = "f1",
            platt: bool = True) -> tuple[Calibration, float]:  # fmt: skip
        """Fit on validation logits of held-out spots (``groups``: their sections); returns (calibration, score)."""
        from sklearn.linear_model import LogisticRegression

        logits = np.asarray(logits, dtype=np.float64).ravel()
        labels = np.asarray(labels, dtype=np.float64).ravel()
        g = _groups(logits.size, groups)
        keep = np.isfinite(labels) & np.isfinite(logits)
        if np.unique(labels[keep]).size < 2:
            msg = f"Validation labels must contain both classes to choose a threshold, found only {np.unique(labels[keep]).tolist()}."
            raise ValueError(msg)
        # section statistics use every spot of the section (labelled or not), as at prediction time
        x_all = standardise_by_section(logits, g) if strategy == "section" else logits
        x, y = x_all[keep], labels[keep].astype(int)
        a, b, method = 1.0, 0.0, "none"
        if platt:
            lr = LogisticRegression(C=1e4).fit(x[:, None], y)
            a_fit, b_fit = float(lr.coef_[0, 0]), float(lr.intercept_[0])
            if a_fit > 0:
                a, b, method = a_fit, b_fit, "platt"
            else:
                # validation logits that do not separate the classes give no usable slope: keep the ranking
                method = "none (platt slope <= 0)"
        # the tumour fractions the validation sections span bound the prior-shift estimate (one section: no bound)
        fractions = [float(np.mean(y[g[keep] == s])) for s in np.unique(g[keep])]
        prior_range = (min(fractions), max(fractions)) if len(fractions) >= 2 else (1e-3, 1 - 1e-3)
        cal = cls(strategy, a, b, train_prior=float(y.mean()), method=method, prior_range=prior_range)
        p = cal._scores(x_all, g)[keep]
        t, val = best_threshold(p, y, criterion)
        cal.threshold = t
        cal.fraction = float(np.mean(p >= t))
        return cal, val

    # -- applying --------------------------------------------------------------------------------------
    def _scores(self, x: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """Scores of already-standardised (``'section'``) or raw logits ``x``."""
        p = _sigmoid(self.a * x + self.b)
        if self.strategy == "prior":
            out = p.copy()
            for s in np.unique(groups):
                m = groups == s
                out[m], _ = prior_shift(p[m], self.train_prior, bounds=self.prior_range)
            return out
        return p

    def apply(self, logits: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
        """Calibrated scores in [0, 1] of ``logits`` (per-section steps use ``groups``; ``None`` = one section).

        For ``'quantile'`` the score is rescaled per section so that :attr:`threshold` cuts the section at its
        stored tumour fraction (the scores keep their order within a section).
        """
        logits = np.asarray(logits, dtype=np.float64).ravel()
        g = _groups(logits.size, groups)
        x = standardise_by_section(logits, g) if self.strategy == "section" else logits
        p = self._scores(x, g)
        if self.strategy == "quantile":
            out = p.copy()
            for s in np.unique(g):
                m = g == s
                cut = np.quantile(p[m], 1 - self.fraction)
                # monotone map sending the section's own quantile cut to the stored threshold
                lo = p[m] < cut
                out[m] = np.where(lo, p[m] / max(cut, 1e-12) * self.threshold,
                                  self.threshold + (p[m] - cut) / max(1 - cut, 1e-12) * (1 - self.threshold))  # fmt: skip
            return np.clip(out, 0.0, 1.0)
        return p

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "method": self.method, "a": self.a, "b": self.b,
                "train_prior": self.train_prior, "threshold": self.threshold, "fraction": self.fraction,
                "prior_range": list(self.prior_range)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(d.get("strategy", "platt"), d.get("a", 1.0), d.get("b", 0.0), d.get("train_prior", 0.5),
                   d.get("threshold", 0.5), d.get("fraction", 0.5), d.get("method", "platt"),
                   tuple(d.get("prior_range", (1e-3, 1 - 1e-3))))  # fmt: skip


def compare_strategies(
    logits: dict[str, np.ndarray], labels: dict[str, np.ndarray], *, criterion: Literal["f1", "youden"] = "f1",
    strategies: tuple[str, ...] = STRATEGIES,
) -> dict[str, dict[str, Any]]:
    """Nested leave-one-section-out over validation sections: how each strategy's threshold transfers.

    For every held-out section ``v`` the strategy is fitted on the *other* sections' validation logits and
    applied to ``v``; per strategy the result holds per-section F1, sensitivity, specificity and calibration
    error, and their means. Only validation (reference) labels are read.
    """
    names = list(logits)
    out: dict[str, dict[str, Any]] = {}
    for s in strategies:
        rows: dict[str, dict[str, float]] = {}
        for v in names:
            others = [n for n in names if n != v]
            if not others:
                continue
            lo = np.concatenate([logits[n] for n in others])
            la = np.concatenate([labels[n] for n in others])
            gr = np.concatenate([[i] * len(logits[n]) for i, n in enumerate(others)])
            if np.unique(la[np.isfinite(la)]).size < 2:
                continue
            cal, _ = Calibration.fit(lo, la, gr, strategy=s, criterion=criterion)  # type: ignore[arg-type]
            p = cal.apply(logits[v])
            y = labels[v]
            keep = np.isfinite(y)
            p, y = p[keep], y[keep].astype(int)
            pred = p >= cal.threshold
            tp, fp = int(np.sum(pred & (y == 1))), int(np.sum(pred & (y == 0)))
            fn, tn = int(np.sum(~pred & (y == 1))), int(np.sum(~pred & (y == 0)))
            rows[v] = {
                "f1": 2 * tp / max(2 * tp + fp + fn, 1),
                "sensitivity": tp / max(tp + fn, 1) if (tp + fn) else float("nan"),
                "specificity": tn / max(tn + fp, 1) if (tn + fp) else float("nan"),
                "youden": (tp / max(tp + fn, 1) + tn / max(tn + fp, 1) - 1) if (tp + fn) and (tn + fp) else float("nan"),
                "ece": expected_calibration_error(p, y),
                "threshold": float(cal.threshold),
            }
        if rows:
            mean = {k: float(np.nanmean([r[k] for r in rows.values()])) for k in ("f1", "sensitivity", "specificity", "youden", "ece")}
            out[s] = {"sections": rows, **{f"mean_{k}": v for k, v in mean.items()}}
    return out
