"""Numerical checks of the GD-MoFO convergence bound (MoFO, arXiv 2407.20999).

    losses.py  toy losses written once in sympy; gradient, Hessian, L and f* come from the formula
    gd.py      GD-MoFO (gd_mofo_step_, mask from mofo.topk_mask_reference), recording what the
               proof needs
    check.py   the filter lemma, the descent inequality and the bound, checked at every step
    adam.py    the Adam-based MoFO on the same losses: observed, not proved

`python -m theory` prints the results table; theory/README.md states the theorem and its proof.
"""
