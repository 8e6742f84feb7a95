"""Evaluation measures on arrays, below the objectives so that training-time evaluations can use
them: classification metrics, weighted kNN, retrieval recall@k, zero-shot prompt classifiers, ViT
attention maps, and the sharded pass over a data split that produces the arrays. Nothing here
reads checkpoints or trains; ``medfm_jax.evaluate`` composes these into protocols over checkpoints.
"""
