"""Distributed differential privacy under secure aggregation (Kairouz et al. ICML'21, Agarwal
et al. NeurIPS'21): clip, rotate, scale, conditionally round, add secret integer noise.

Modules: :mod:`~secagg.dp.rotation` (public randomized Hadamard rotation),
:mod:`~secagg.dp.noise` (CSPRNG Skellam / discrete Gaussian samplers, with exact tables from
:mod:`~secagg.dp.exact_pmf`), :mod:`~secagg.dp.encoder` (float update <-> ring vector),
:mod:`~secagg.dp.calibration` (noise, scale and ring checks for a privacy target against the
server), :mod:`~secagg.dp.rdp` (RDP formulas).
"""
