"""Ablation sweeps: grids of config overrides (:mod:`grid`), sweep files (:mod:`spec`), the
sequential resumable runner (:mod:`runner`, CLI ``python -m medfm_jax.sweeps``) and the readers and
plots behind ``python -m medfm_jax.sweeps.report`` (:mod:`collect`, :mod:`plots`)."""
