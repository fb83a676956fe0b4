"""Gradient-inversion attacks, used to test what each view of an update reveals.

Attacks take an update (``{name: float64 array}``) and the public global model, never the
private inputs; :mod:`proofs.attacks.views` builds what the server holds under each deployment
(plaintext FedAvg, a secagg-masked vector, the secure sum, the DP-noised secure sum) and
:mod:`proofs.attacks.matrix` runs every attack on every view.
"""
