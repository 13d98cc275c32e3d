"""Numerical checks of two MoFO convergence bounds (MoFO, arXiv 2407.20999): GD-MoFO's, and an
O(log T/√T) bound for the Adam-based MoFO with step size η/√t.

    losses.py  toy losses written once in sympy; gradient, Hessian, L and f* come from the formula
    gd.py      GD-MoFO (gd_mofo_step_, mask from mofo.topk_mask_reference), recording what the
               proof needs
    check.py   the filter lemma, the descent inequality and the bound, checked at every step
    adam.py    the Adam-based MoFO (mofo.MoFO, constant lr) on the same losses: observed only
    adam_bound.py  the Adam-based MoFO with lr η/√t (it is mofo.MoFO under that schedule), an
               explicit O(log T/√T) bound on the filtered gradient, its lemmas, checked per step

`python -m theory` prints the results table; theory/README.md states both bounds and their proofs.
"""
