"""Federated ComBat: harmonise radiomics features across sites without pooling patient rows.

The result equals ComBat (parametric empirical Bayes, as in ``neuroCombat``) run on the pooled
table, but each site sends only summary statistics of its own table and applies the hub's
answer to its own rows:

1. **Site** (:func:`site_summary`): with its design ``Z = [1, one-hot of each categorical
   covariate level present, continuous covariates]`` and its features ``Y`` centred on its own
   means ``m``, it sends ``n``, ``Z'Z``, ``Z'(Y - m)``, the column sums of squares of
   ``Y - m`` and ``m``: sums over rows, never a row.
2. **Hub** (:func:`estimate`): embeds each site's matrices in the pooled design (one column
   per site, categorical levels sorted with the first dropped, as neuroCombat does), solves
   the pooled least squares for the coefficients ``B``, and derives from the same statistics,
   in closed form, what ComBat computes from the rows: the pooled variance, the grand mean, each
   site's location ``gamma_hat`` and scale ``delta_hat`` of the standardised data, the
   empirical-Bayes priors and the shrunken ``gamma*``/``delta*`` (same iteration as
   neuroCombat). It returns one :class:`SiteAdjustment` per site.
3. **Site** (:func:`apply_adjustment`): ``y* = (y - g - x'b - gamma* sqrt(v)) / sqrt(delta*)
   + g + x'b`` for its own rows, with ``g`` the grand mean, ``x'b`` the covariate effects and
   ``v`` the pooled variance.

Centring on the site's own means keeps the residual sums of squares accurate for features with
large values (no cancellation of ``sum(y^2) - n mean^2`` terms at the hub).

Like neuroCombat, continuous covariates are used as given (neuroCombat casts them to float32:
pass values that float32 represents exactly, e.g. whole years, to compare the two).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.errors import OncoflowError

BATCH = "batch"
CONVERGENCE = 1e-4  # neuroCombat's it_sol tolerance
#: A pyradiomics feature column name (``<image type>_<class>_<feature>``).
FEATURE_COLUMN = r"^[a-z][A-Za-z0-9-]*_[A-Za-z0-9]+_[A-Za-z0-9]+$"


def _cat(name: str, level: str) -> str:
    return f"cat:{name}={level}"


def _num(name: str) -> str:
    return f"num:{name}"


@dataclass
class SiteSummary:
    """What one site sends to the hub: sums over its rows, no row.

    Parameters
    ----------
    site
        Site code (the batch).
    n
        Number of rows.
    features
        Feature names, in column order of the matrices.
    columns
        Labels of the site's design columns (``batch``, ``cat:<name>=<level>``,
        ``num:<name>``).
    categorical, continuous
        Covariate names.
    gram
        ``Z'Z``.
    zty
        ``Z'(Y - m)``.
    ssq
        Column sums of ``(Y - m)**2``.
    mean
        Column means ``m``.
    roi
        The ROI whose rows were summarised (empty in summaries published before it was
        recorded).
    """

    site: str
    n: int
    features: list[str]
    columns: list[str]
    categorical: list[str]
    continuous: list[str]
    gram: list[list[float]]
    zty: list[list[float]]
    ssq: list[float]
    mean: list[float]
    roi: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiteSummary:
        """Read back :meth:`to_dict` output (one-line error when malformed)."""
        try:
            optional = {"roi"}  # absent from summaries published before it was recorded
            return cls(
                **{k: data[k] for k in cls.__dataclass_fields__ if k not in optional or k in data}
            )
        except (KeyError, TypeError) as exc:
            raise OncoflowError(f"malformed ComBat site summary ({exc})") from None


@dataclass
class SiteAdjustment:
    """What the hub returns to one site: everything needed to harmonise its own rows.

    Parameters
    ----------
    site
        Site code.
    features
        Feature names.
    columns
        The site's covariate design columns (``cat:...``/``num:...``) that have an effect.
    coef
        Covariate effects ``b`` for those columns (columns x features).
    grand_mean, var_pooled, gamma_star, delta_star
        Per feature.
    """

    site: str
    features: list[str]
    columns: list[str]
    coef: list[list[float]]
    grand_mean: list[float]
    var_pooled: list[float]
    gamma_star: list[float]
    delta_star: list[float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiteAdjustment:
        """Read back :meth:`to_dict` output (one-line error when malformed)."""
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as exc:
            raise OncoflowError(f"malformed ComBat adjustment ({exc})") from None


def _matrix(table: pa.Table, names: Sequence[str], what: str) -> np.ndarray:
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise OncoflowError(f"{what} column(s) missing: {', '.join(missing)}")
    cols = []
    for name in names:
        values = table.column(name).to_numpy(zero_copy_only=False)
        try:
            values = values.astype(np.float64)
        except (TypeError, ValueError):
            raise OncoflowError(f"{what} column {name} is not numeric") from None
        if not np.isfinite(values).all():
            raise OncoflowError(f"{what} column {name} has missing or infinite values")
        cols.append(values)
    return np.column_stack(cols) if cols else np.zeros((table.num_rows, 0))


def site_design(
    table: pa.Table, categorical: Sequence[str], continuous: Sequence[str]
) -> tuple[np.ndarray, list[str]]:
    """Build a site's local design ``Z`` (ones, one-hot of every local level, continuous)."""
    blocks = [np.ones((table.num_rows, 1))]
    labels = [BATCH]
    for name in categorical:
        if name not in table.column_names:
            raise OncoflowError(f"covariate column {name} missing")
        values = [str(v) for v in table.column(name).to_pylist()]
        if any(v in ("None", "") for v in values):
            raise OncoflowError(f"covariate column {name} has missing values")
        for level in sorted(set(values)):
            blocks.append(np.array([[v == level] for v in values], dtype=np.float64))
            labels.append(_cat(name, level))
    blocks.append(_matrix(table, continuous, "covariate"))
    labels.extend(_num(c) for c in continuous)
    return np.hstack(blocks), labels


def site_summary(
    site: str,
    table: pa.Table,
    features: Sequence[str],
    categorical: Sequence[str] = (),
    continuous: Sequence[str] = (),
) -> SiteSummary:
    """Compute the summary statistics a site sends to the hub.

    Parameters
    ----------
    site
        Site code.
    table
        The site's rows: feature columns and covariate columns.
    features
        Feature columns to harmonise.
    categorical, continuous
        Covariates whose effects ComBat preserves.

    Returns
    -------
    SiteSummary
        Sums over rows only.
    """
    if table.num_rows < 2:
        raise OncoflowError(f"site {site} has {table.num_rows} row(s): ComBat needs at least 2")
    y = _matrix(table, features, "feature")
    z, labels = site_design(table, categorical, continuous)
    mean = y.mean(axis=0)
    yc = y - mean
    return SiteSummary(
        site=site,
        n=int(table.num_rows),
        features=list(features),
        columns=labels,
        categorical=list(categorical),
        continuous=list(continuous),
        gram=(z.T @ z).tolist(),
        zty=(z.T @ yc).tolist(),
        ssq=(yc**2).sum(axis=0).tolist(),
        mean=mean.tolist(),
    )


def age_in_years(value: str | None) -> float | None:
    """Years from a DICOM age string (``063Y``, ``018M``, ``006W``, ``030D``), None if absent."""
    if not value or len(value) < 2 or not value[:-1].isdigit():
        return None
    per_year = {"Y": 1.0, "M": 12.0, "W": 52.0, "D": 365.0}.get(value[-1].upper())
    return int(value[:-1]) / per_year if per_year else None


def cohort_rows(
    series: pa.Table,
    features: pa.Table,
    roi: str,
    categorical: Sequence[str] = (),
    continuous: Sequence[str] = (),
    feature_pattern: str = FEATURE_COLUMN,
) -> tuple[pa.Table, list[str]]:
    """Return a published cohort's rows of one ROI with their covariates, and the features.

    Covariates are columns of the published series table (``age`` is derived from
    ``age_at_study`` in years) or numeric columns of the feature table. Feature columns with a
    missing or infinite value in any row are left out.
    """
    rows = features.filter(pc.equal(features.column("roi"), roi))
    by_series = {r["series"]: r for r in series.to_pylist()}
    covariates: dict[str, list[Any]] = {}
    for name in [*categorical, *continuous]:
        if name in rows.column_names:
            covariates[name] = rows.column(name).to_pylist()
            continue
        values = []
        for key in rows.column("series").to_pylist():
            row = by_series.get(key, {})
            values.append(age_in_years(row.get("age_at_study")) if name == "age" else row.get(name))
        if any(v is None for v in values):
            raise OncoflowError(f"ComBat: covariate {name} is missing for some series")
        covariates[name] = values
    pattern = re.compile(feature_pattern)
    names = []
    for name in rows.column_names:
        if not pattern.match(name) or name in covariates:
            continue
        column = rows.column(name)
        if not pa.types.is_floating(column.type) and not pa.types.is_integer(column.type):
            continue
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        if np.isfinite(values).all():
            names.append(name)
    table = pa.table(
        {
            **{n: rows.column(n) for n in names},
            **{c: pa.array([str(v) for v in covariates[c]]) for c in categorical},
            **{c: pa.array(covariates[c], pa.float64()) for c in continuous},
        }
    )
    return table, names


def cohort_summary(
    site: str,
    series: pa.Table,
    features: pa.Table,
    roi: str,
    categorical: Sequence[str] = (),
    continuous: Sequence[str] = (),
    feature_pattern: str = FEATURE_COLUMN,
) -> SiteSummary:
    """Summarise a published cohort's feature rows of one ROI for federated ComBat.

    The rows and features are those of :func:`cohort_rows` (the hub keeps the features every
    site has).
    """
    count = int(pc.sum(pc.equal(features.column("roi"), roi)).as_py() or 0)
    if count < 2:
        raise OncoflowError(f"ComBat: site {site} has {count} row(s) for ROI {roi!r}")
    table, names = cohort_rows(series, features, roi, categorical, continuous, feature_pattern)
    summary = site_summary(site, table, names, categorical, continuous)
    summary.roi = roi
    return summary


def _it_sol(
    n: int,
    ss: np.ndarray,
    g_hat: np.ndarray,
    d_hat: np.ndarray,
    g_bar: float,
    t2: float,
    a: float,
    b: float,
) -> tuple[np.ndarray, np.ndarray]:
    """NeuroCombat's parametric EB iteration, from sums (``ss``: sum of (s - g_hat)^2)."""
    g_old, d_old = g_hat.copy(), d_hat.copy()
    while True:
        g_new = (t2 * n * g_hat + d_old * g_bar) / (t2 * n + d_old)
        sum2 = ss + n * (g_hat - g_new) ** 2
        d_new = (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)
        change = max((np.abs(g_new - g_old) / g_old).max(), (np.abs(d_new - d_old) / d_old).max())
        g_old, d_old = g_new, d_new
        if not change > CONVERGENCE:
            return g_new, d_new


def _varies(s: SiteSummary, feature: str) -> bool:
    """Whether a feature varies within a site (not constant up to rounding)."""
    i = s.features.index(feature)
    scale = max(1.0, abs(s.mean[i]))
    return s.ssq[i] / s.n > (1e-9 * scale) ** 2


def common_features(summaries: Sequence[SiteSummary]) -> list[SiteSummary]:
    """Restrict every summary to the features all sites have and that vary at every site.

    A feature constant at a site has no scale to estimate there (and pooled ComBat would
    divide rounding noise by rounding noise): it is left out and stays unharmonised.
    """
    shared = set.intersection(*(set(s.features) for s in summaries))
    keep = [
        f for f in summaries[0].features if f in shared and all(_varies(s, f) for s in summaries)
    ]
    if len(keep) < 2:
        raise OncoflowError("ComBat needs at least two features that vary at every site")
    out = []
    for s in summaries:
        idx = [s.features.index(f) for f in keep]
        zty = np.asarray(s.zty).reshape(len(s.columns), -1)[:, idx]
        out.append(
            SiteSummary(
                site=s.site,
                n=s.n,
                features=keep,
                columns=s.columns,
                categorical=s.categorical,
                continuous=s.continuous,
                gram=s.gram,
                zty=zty.tolist(),
                ssq=[s.ssq[i] for i in idx],
                mean=[s.mean[i] for i in idx],
            )
        )
    return out


def estimate(
    summaries: Sequence[SiteSummary], empirical_bayes: bool = True
) -> dict[str, SiteAdjustment]:
    """Estimate ComBat at the hub from the sites' summaries.

    Parameters
    ----------
    summaries
        One per site (at least two sites, the same features and covariates).
    empirical_bayes
        Shrink the per-site location/scale with parametric empirical-Bayes priors (ComBat's
        default); False uses the plain estimates.

    Returns
    -------
    dict
        Site code → its adjustment.
    """
    if len(summaries) < 2:
        raise OncoflowError("federated ComBat needs at least two sites")
    sites = [s.site for s in summaries]
    if len(set(sites)) != len(sites):
        raise OncoflowError("each site must send one ComBat summary")
    summaries = common_features(summaries)
    first = summaries[0]
    for s in summaries:
        if (s.categorical, s.continuous) != (first.categorical, first.continuous):
            raise OncoflowError(f"site {s.site} summarised other covariates")
    order = sorted(summaries, key=lambda s: s.site)
    batches = [s.site for s in order]
    levels = {
        name: sorted(
            {c.split("=", 1)[1] for s in order for c in s.columns if c.startswith(f"cat:{name}=")}
        )
        for name in first.categorical
    }
    covariate_cols = [_cat(n, lev) for n in first.categorical for lev in levels[n][1:]]
    covariate_cols += [_num(c) for c in first.continuous]
    columns = [f"batch:{b}" for b in batches] + covariate_cols
    n_cols, n_feat = len(columns), len(first.features)

    def selection(s: SiteSummary) -> np.ndarray:
        """Map the site's local design columns to the pooled design (local x pooled)."""
        sel = np.zeros((len(s.columns), n_cols))
        for i, label in enumerate(s.columns):
            target = f"batch:{s.site}" if label == BATCH else label
            if target in columns:
                sel[i, columns.index(target)] = 1.0
        return sel

    xtx = np.zeros((n_cols, n_cols))
    xty = np.zeros((n_cols, n_feat))
    parts = []
    for s in order:
        sel = selection(s)
        gram, zty = np.asarray(s.gram), np.asarray(s.zty)
        mean = np.asarray(s.mean)
        zy = zty + np.outer(gram[:, 0], mean)  # Z'Y = Z'(Y - m) + (Z'1) m'
        xtx += sel.T @ gram @ sel
        xty += sel.T @ zy
        parts.append((s, sel, gram, zty, mean))
    if np.linalg.matrix_rank(xtx) < n_cols:
        raise OncoflowError(
            "the pooled design is singular: a covariate is constant or confounded with site"
        )
    coef = np.linalg.solve(xtx, xty)  # pooled B: columns x features
    n_total = sum(s.n for s in order)
    batch_coef = coef[: len(batches)]
    grand_mean = sum(s.n / n_total * batch_coef[i] for i, s in enumerate(order))

    stats = []
    ssr_total = np.zeros(n_feat)
    for i, (s, sel, gram, zty, mean) in enumerate(parts):
        local = sel @ coef  # the site's coefficients in its local columns
        centred = local.copy()
        centred[0] -= mean  # residual e = (Y - m) - Z (b - e_batch m')
        ssr = (
            np.asarray(s.ssq)
            - 2.0 * (centred * zty).sum(axis=0)
            + (centred * (gram @ centred)).sum(axis=0)
        )
        sum_e = -(gram[0] @ centred)
        ssr_total += ssr
        stats.append((ssr, sum_e, batch_coef[i] - grand_mean))
    var_pooled = ssr_total / n_total
    var_pooled[var_pooled == 0] = np.median(var_pooled != 0)  # as neuroCombat does

    adjustments = {}
    for (s, *_), (ssr, sum_e, shift) in zip(parts, stats, strict=True):
        n = s.n
        gamma_hat = (sum_e + n * shift) / (n * np.sqrt(var_pooled))
        ss = (ssr - sum_e**2 / n) / var_pooled  # sum of (s - gamma_hat)^2 over the site's rows
        delta_hat = ss / (n - 1)
        delta_hat = np.where(delta_hat == 0, 1.0, delta_hat)
        if empirical_bayes:
            g_bar = float(gamma_hat.mean())
            t2 = float(np.var(gamma_hat, ddof=1))
            m, s2 = float(delta_hat.mean()), float(np.var(delta_hat, ddof=1))
            a_prior = (2 * s2 + m**2) / s2
            b_prior = (m * s2 + m**3) / s2
            gamma_star, delta_star = _it_sol(
                n, ss, gamma_hat, delta_hat, g_bar, t2, a_prior, b_prior
            )
        else:
            gamma_star, delta_star = gamma_hat, delta_hat
        local_cols = [c for c in s.columns if c in covariate_cols]
        idx = [columns.index(c) for c in local_cols]
        adjustments[s.site] = SiteAdjustment(
            site=s.site,
            features=list(first.features),
            columns=local_cols,
            coef=coef[idx].tolist(),
            grand_mean=grand_mean.tolist(),
            var_pooled=var_pooled.tolist(),
            gamma_star=np.asarray(gamma_star).tolist(),
            delta_star=np.asarray(delta_star).tolist(),
        )
    return adjustments


def apply_adjustment(table: pa.Table, adjustment: SiteAdjustment) -> pa.Table:
    """Harmonise a site's own rows with the hub's adjustment (feature columns replaced).

    Parameters
    ----------
    table
        The rows the summary was computed from (same covariate columns).
    adjustment
        The hub's answer for this site.

    Returns
    -------
    pyarrow.Table
        The table with harmonised feature values (float64); other columns unchanged.
    """
    y = _matrix(table, adjustment.features, "feature")
    categorical = sorted(
        {c[4:].split("=", 1)[0] for c in adjustment.columns if c.startswith("cat:")}
    )
    continuous = [c[4:] for c in adjustment.columns if c.startswith("num:")]
    z, labels = site_design(table, categorical, continuous)
    x = (
        np.column_stack(
            [z[:, labels.index(c)] if c in labels else np.zeros(len(y)) for c in adjustment.columns]
        )
        if adjustment.columns
        else np.zeros((len(y), 0))
    )
    if adjustment.columns:
        mod_mean = x @ np.asarray(adjustment.coef).reshape(len(adjustment.columns), -1)
    else:  # no covariate: nothing to preserve
        mod_mean = np.zeros_like(y)
    grand = np.asarray(adjustment.grand_mean)
    sd = np.sqrt(np.asarray(adjustment.var_pooled))
    s_data = (y - grand - mod_mean) / sd
    adjusted = (s_data - np.asarray(adjustment.gamma_star)) / np.sqrt(
        np.asarray(adjustment.delta_star)
    )
    out = adjusted * sd + grand + mod_mean
    for j, name in enumerate(adjustment.features):
        table = table.set_column(
            table.column_names.index(name), name, pa.array(out[:, j], pa.float64())
        )
    return table
