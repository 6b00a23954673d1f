"""The statistics of the report: a mean and its standard error over seeds, a paired sign-flip test for two
conditions measured on the same seeds, and Pearson r with a permutation p-value (Fig. 6), stratified by seed.

No p-values are averaged anywhere: the mean of per-seed p-values is not a p-value of anything. Seeds are pooled
either by testing the per-seed differences (sign flips) or by one permutation test over all entries of all seeds
that shuffles only within a seed (the entries of one seed are never paired with another seed's).
"""
import itertools
import math

import numpy as np

EXACT_MAX_N = 16            # up to 2^16 = 65,536 sign patterns the sign-flip test enumerates them all
N_PERM = 10_000             # permutations (or random sign patterns beyond EXACT_MAX_N): p resolves to about 1e-4


# --- a number over seeds ----------------------------------------------------------------------------------

def present(xs):
    return [x for x in (xs or []) if x is not None]


def mean_se(xs):
    """(mean, standard error of the mean, n) over the seeds that have a value; (None, None, 0) when none do.
    The standard error is the sample standard deviation (n - 1) over sqrt(n); None with one seed."""
    xs = present(xs)
    n = len(xs)
    if n == 0:
        return None, None, 0
    m = math.fsum(xs) / n
    if n == 1:
        return m, None, 1
    sd = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))
    return m, sd / math.sqrt(n), n


def mean(xs):
    return mean_se(xs)[0]


# --- two conditions on the same seeds: the exact sign-flip test ---------------------------------------------

def sign_flip_p(diffs, alternative="greater", n_perm=N_PERM, seed=0):
    """p-value of the paired differences `diffs` (condition B - condition A, one per seed or per prompt) under
    H0: each difference is as likely to have either sign (the labels A and B are exchangeable within a pair).
    Statistic: the mean difference. alternative "greater": H1 mean > 0; "two-sided": |mean| large.
    Exact (all 2^n sign patterns, the identity included) for n <= EXACT_MAX_N, otherwise n_perm random patterns
    with p = (1 + #{as extreme}) / (1 + n_perm). The smallest possible exact p is 2^-n (one-sided):
    0.125 for 3 seeds, so 3 seeds can show a consistent sign but never p < 0.05."""
    d = np.asarray(present(diffs), dtype=np.float64)
    n = len(d)
    if n == 0:
        return None
    obs = d.mean()
    if n <= EXACT_MAX_N:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))          # (2^n, n)
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_perm, n))
    null = (signs * d).mean(1)                                                    # (patterns,)
    tol = 1e-12 * max(1.0, abs(obs))                                              # ties count as extreme
    hits = (np.abs(null) >= abs(obs) - tol) if alternative == "two-sided" else (null >= obs - tol)
    if n <= EXACT_MAX_N:
        return float(hits.mean())
    return float((1 + hits.sum()) / (1 + n_perm))


def paired(a, b, alternative="greater"):
    """B - A over the seeds where both exist: {"diff": mean, "se", "n", "p" (sign flip), "per_seed"}."""
    d = [y - x for x, y in zip(a or [], b or []) if x is not None and y is not None]
    m, se, n = mean_se(d)
    return {"diff": m, "se": se, "n": n, "p": sign_flip_p(d, alternative), "per_seed": d}


# --- Pearson r with a permutation p-value ---------------------------------------------------------------------

def pearson(x, y):
    """Pearson r of two equal-length sequences (arrays or CPU tensors); None where it is undefined: fewer than two
    entries, or one of them constant (JSON has no NaN, and a NaN compares False to every threshold silently)."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else None          # one entry: den 0


def show(v, spec="+.3f"):
    """A statistic as text, '—' where it is undefined (None)."""
    return "—" if v is None else format(v, spec)


def _zscore(v, strata):
    """v standardized within each stratum (population sd); a constant stratum becomes all zeros."""
    z = np.zeros_like(v)
    for s in np.unique(strata):
        m = strata == s
        sd = v[m].std()
        z[m] = (v[m] - v[m].mean()) / sd if sd > 0 else 0.0
    return z


def perm_pearson(x, y, strata=None, n_perm=N_PERM, seed=0, chunk=250):
    """(r, two-sided permutation p, n); (None, None, n) where r is undefined (fewer than 3 entries, or x or y
    constant within every stratum). Within each stratum (a seed) x and y are standardized, so r is the
    Pearson r of the pooled standardized entries (the n-weighted mean of the per-seed r); the null shuffles x
    within each stratum with a fixed generator, and p = (1 + #{|r_perm| >= |r|}) / (1 + n_perm)."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{x.size} downstream entries against {y.size} informative entries: they must pair up")
    strata = np.zeros(len(x), int) if strata is None else np.asarray(strata).ravel()
    n = len(x)
    zx, zy = _zscore(x, strata), _zscore(y, strata)
    if n < 3 or not zx.any() or not zy.any():
        return None, None, n
    r = float((zx * zy).sum() / n)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    hits, done = 0, 0
    while done < n_perm:
        b = min(chunk, n_perm - done)
        perm = np.empty((b, n), dtype=np.int64)
        for g in groups:                                  # shuffle the positions of each stratum among themselves
            perm[:, g] = rng.permuted(np.tile(g, (b, 1)), axis=1)
        r_perm = (zx[perm] * zy).sum(1) / n               # (b,)
        hits += int((np.abs(r_perm) >= abs(r) - 1e-12).sum())
        done += b
    return r, (1 + hits) / (1 + n_perm), n


def fig6_stats(downstream, informative, seed=0, strata=None):
    """Fig. 6 in the authors' units: Pearson r over per-entry scores (MLPs: position x layer, heads: position x
    layer x head, flattened), with its permutation p; `strata` labels each entry's seed when seeds are pooled."""
    r, p, n = perm_pearson(downstream, informative, strata=strata, seed=seed)
    return {"r": r, "p_perm": p, "n": n}


def midranks(v, strata=None):
    """Ranks 0..n-1 within each stratum, ties sharing their mean rank: Spearman's rho is Pearson r of these."""
    v = np.asarray(v, np.float64).ravel()
    strata = np.zeros(len(v), int) if strata is None else np.asarray(strata).ravel()
    out = np.empty_like(v)
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        vals = v[idx]
        order = np.argsort(vals, kind="stable")
        r = np.empty(len(vals))
        r[order] = np.arange(len(vals), dtype=np.float64)
        for u in np.unique(vals):                          # ties: the mean of the ranks they span
            tie = vals == u
            r[tie] = r[tie].mean()
        out[idx] = r
    return out


def spearman_pooled(x, y, strata, seed=0):
    """Spearman's rho of x and y ranked within each stratum (seed), pooled as perm_pearson pools: (rho, p, n)."""
    return perm_pearson(midranks(x, strata), midranks(y, strata), strata=strata, seed=seed)
