"""Ablation sweeps: grids of config overrides (:mod:`grid`), sweep files (:mod:`spec`), the
sequential resumable runner (:mod:`runner`, CLI ``python -m medfm_jax.sweep``) and the readers and
plots behind ``python -m medfm_jax.report`` (:mod:`collect`, :mod:`plots`)."""
