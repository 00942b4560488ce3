"""Chapter 4's statistics primer: a toy family of three paired cells, built from a seeded generator,
run through the same calls as the audit (:func:`moeaudit.stats.paired_effect`,
:func:`moeaudit.stats.correct_family`, :func:`moeaudit.stats.jzs_bayes_factor`), and the sentences
that walk through one cell (every number and verdict read from those results)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..report import fmt_signed
from ..stats import correct_family, jeffreys_label, jzs_bayes_factor, paired_effect, t_test_power, tost_min_p

#: The toy cells' true mean difference E[D] in nats (a clear effect, a small one, none) and the
#: spread of D. They only generate the example; every number the primer states is computed from it.
TOY_MEANS = {"A": 0.03, "B": 0.01, "C": 0.0}
TOY_SD = 0.04
#: Scale of the Cauchy prior on d_z of the JZS Bayes factor (the default of Rouder et al. 2009).
BF_PRIOR_R = 0.707


def toy_cells(*, n: int = 20, seed: int = 0) -> pd.DataFrame:
    """Toy loss changes for three cells of one family, ``n`` positions each.

    Returns a long frame with ``cell`` ("A", "B", "C"), ``position`` (0..n-1), ``delta_loss_high``
    and ``delta_loss_low`` (nats: the loss change when the highest- and the lowest-ranked active
    expert is removed) and ``D`` = high − low. ``low`` is Gamma(2, 0.02) (positive, skewed, as loss
    changes are) and ``D`` is Normal(:data:`TOY_MEANS`, :data:`TOY_SD`). ``ValueError`` for
    ``n < 3`` (too few pairs for the tests)."""
    if n < 3:
        raise ValueError(f"n must be at least 3 (pairs per toy cell), got {n!r}")
    rng = np.random.default_rng(seed)
    rows = []
    for cell, mean in TOY_MEANS.items():
        low = rng.gamma(2.0, 0.02, n)
        high = low + rng.normal(mean, TOY_SD, n)
        rows.append(pd.DataFrame({"cell": cell, "position": np.arange(n), "delta_loss_high": high,
                                  "delta_loss_low": low, "D": high - low}))
    return pd.concat(rows, ignore_index=True)


def toy_family(cells: pd.DataFrame, *, alpha: float = 0.05, tost_bound_d: float = 0.2,
               power: float = 0.8) -> pd.DataFrame:
    """:func:`moeaudit.stats.paired_effect` for each toy cell (Bonferroni over the family of all
    cells), then :func:`moeaudit.stats.correct_family` (Bonferroni, Holm, Benjamini–Hochberg) and
    the JZS Bayes factor ``BF10`` of each cell. One row per cell."""
    m = cells.cell.nunique()
    rows = [paired_effect(g.delta_loss_high.to_numpy(), g.delta_loss_low.to_numpy(), alpha=alpha, n_tests=m,
                          tost_bound_d=tost_bound_d, power=power).assign(cell=cell, bf10=jzs_bayes_factor(g.D, r=BF_PRIOR_R))
            for cell, g in cells.groupby("cell", sort=True)]
    return correct_family(pd.concat(rows, ignore_index=True).assign(family="toy"), family=("family",), alpha=alpha)


def _passes(flag: bool) -> str:
    return "passes" if flag else "does not pass"


def primer_values(family: pd.DataFrame, *, cell: str = "A", small: str = "B", alpha: float = 0.05,
                  n_audit: int = 200) -> dict:
    """The values the primer's prose glues, for toy cell ``cell`` of :func:`toy_family`'s result:
    numbers formatted for reading and the verdict phrases computed from them. ``small`` names the cell
    with a small true effect (its true d_z is ``TOY_MEANS[small] / TOY_SD``); ``n_audit`` is the
    number of positions per cell of the audit that follows (for its smallest possible TOST p-value)."""
    by_cell = family.set_index("cell")
    r, s = by_cell.loc[cell], by_cell.loc[small]
    true_dz = TOY_MEANS[small] / TOY_SD
    min_p_audit = tost_min_p(int(n_audit), bound_d=float(r.tost_bound_d))
    m = len(family)
    min_p = tost_min_p(int(r.n), bound_d=float(r.tost_bound_d))
    holm_only = family[family.sig_dual_holm & ~family.sig_dual_bonf].cell.tolist()
    bh_only = family[family.sig_dual_bh & ~family.sig_dual_holm].cell.tolist()
    return {
        "pr_cell": cell, "pr_n": int(r.n), "pr_m": m, "pr_dof": int(r.dof),
        "pr_mean": fmt_signed(r.mean_d, 4), "pr_sd": f"{r.sd_d:.4f}",
        "pr_dz": fmt_signed(r.cohens_dz, 2), "pr_dz_ci": f"[{r.dz_ci_low:+.2f}, {r.dz_ci_high:+.2f}]",
        "pr_t": f"{r.t:.2f}", "pr_p_t": f"{r.p_t:.2g}", "pr_W": f"{r.W:g}", "pr_p_W": f"{r.p_W:.2g}",
        "pr_alpha": f"{alpha:g}", "pr_alpha_c": f"{r.alpha_corrected:.4g}",
        "pr_same_sign": "point the same way" if r.same_sign else "do not point the same way",
        "pr_dual": _passes(bool(r.sig_dual)),
        "pr_n_bonf": int(family.sig_dual_bonf.sum()), "pr_n_holm": int(family.sig_dual_holm.sum()),
        "pr_n_bh": int(family.sig_dual_bh.sum()),
        "pr_holm_extra": (f"Holm adds cell {', '.join(holm_only)}" if holm_only
                          else "Holm adds no cell here"),
        "pr_bh_extra": (f"Benjamini–Hochberg adds cell {', '.join(bh_only)}" if bh_only
                        else "Benjamini–Hochberg adds no cell here"),
        "pr_mde": f"{r.mde_dz:.2f}", "pr_power": f"{r.power:g}",
        "pr_tost_bound": f"{r.tost_bound_d:g}", "pr_p_tost": f"{r.p_tost:.2g}",
        "pr_tost_min_p": f"{min_p:.2g}",
        "pr_tost_possible": ("could in principle show equivalence" if min_p < r.alpha_corrected
                             else "cannot show equivalence whatever the data"),
        "pr_small": small, "pr_small_true_dz": f"{true_dz:.2f}",
        "pr_small_power": f"{t_test_power(true_dz, int(s.n), alpha=float(s.alpha_corrected)):.2f}",
        "pr_small_found": ("this draw detects it nonetheless (the dual rule under Bonferroni), by luck "
                           "rather than by design" if s.sig_dual_bonf else
                           "this draw misses it: a non-significant cell is not evidence of no effect, and "
                           "says little about effects smaller than the minimum detectable one"),
        "pr_small_below": "below" if true_dz < r.mde_dz else "not below",
        "pr_n_audit": int(n_audit), "pr_tost_min_p_audit": f"{min_p_audit:.2g}",
        "pr_bf_r": f"{BF_PRIOR_R:g}",
        "pr_small_bf10": f"{s.bf10:.3g}", "pr_small_bf_label": jeffreys_label(float(s.bf10)),
        "pr_bf10": f"{r.bf10:.3g}", "pr_bf_label": jeffreys_label(float(r.bf10)),
    }
