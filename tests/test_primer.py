"""Chapter 4's statistics primer: the toy family and the phrases read from it."""

import numpy as np
import pytest

from moeaudit.chapters import primer


def test_toy_cells_shape_and_differences():
    toy = primer.toy_cells(n=7, seed=3)
    assert sorted(toy.cell.unique()) == ["A", "B", "C"] and len(toy) == 21
    np.testing.assert_allclose(toy.D, toy.delta_loss_high - toy.delta_loss_low)
    assert (toy.delta_loss_low > 0).all()  # Gamma-distributed loss changes
    with pytest.raises(ValueError, match="n must be at least 3"):
        primer.toy_cells(n=2)


def test_toy_family_statistics_match_hand_computation():
    toy = primer.toy_cells(n=20, seed=1)
    fam = primer.toy_family(toy, alpha=0.05)
    for row in fam.itertuples():
        d = toy[toy.cell == row.cell].D.to_numpy()
        assert row.cohens_dz == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-12)
        assert row.t == pytest.approx(row.cohens_dz * np.sqrt(len(d)), rel=1e-10)  # t = d_z sqrt(n)
        assert row.alpha_corrected == pytest.approx(0.05 / 3)  # Bonferroni over the three cells
    assert (fam.sig_dual_holm >= fam.sig_dual_bonf).all()  # Holm never passes fewer cells


def test_primer_phrases_follow_the_results():
    fam = primer.toy_family(primer.toy_cells(n=20, seed=1))
    v = primer.primer_values(fam, cell="A", small="B", n_audit=200)
    a = fam.set_index("cell").loc["A"]
    assert v["pr_dual"] == ("passes" if a.sig_dual else "does not pass")
    assert v["pr_n_bonf"] == int(fam.sig_dual_bonf.sum())
    assert v["pr_small_true_dz"] == f"{primer.TOY_MEANS['B'] / primer.TOY_SD:.2f}"
    # flip the verdicts: the phrases must follow
    flipped = fam.assign(sig_dual=~fam.sig_dual, sig_dual_bonf=~fam.sig_dual_bonf)
    w = primer.primer_values(flipped, cell="A", small="B")
    assert w["pr_dual"] != v["pr_dual"] and w["pr_small_found"] != v["pr_small_found"]
    # 200 pairs can show equivalence at the toy level, 20 cannot
    assert v["pr_tost_possible"] == "cannot show equivalence whatever the data"
    assert float(v["pr_tost_min_p_audit"]) < float(v["pr_alpha_c"])
