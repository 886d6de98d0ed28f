"""Chunked cross-entropy against the plain loss: the op (values, gradients, z-loss), train and eval loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from mla_jax.config import ModelConfig
from mla_jax.model import LanguageModel, init_params
from mla_jax.ops.cross_entropy import chunked_cross_entropy, cross_entropy_reference, lm_cross_entropy
from mla_jax.train_step import make_eval_step, make_loss_fn


@pytest.mark.parametrize("tied,weighted", [(False, True), (True, False)])
def test_chunked_equals_plain_in_value_and_gradient(tied, weighted):
  B, T, D, V = 3, 13, 16, 40  # chunks of 3 x 2 positions: T = 13 needs one padded position
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  hidden = jax.random.normal(k[0], (B, T, D))
  weight = jax.random.normal(k[1], (V, D) if tied else (D, V)) * 0.5
  targets = jax.random.randint(k[2], (B, T), 0, V)
  weights = jax.random.uniform(k[3], (B, T)).at[0, :4].set(0.0) if weighted else None
  head = (lambda w: w.T) if tied else (lambda w: w)

  def losses(fn):
    def total(h, w):
      nll, count, z = fn(h, head(w))
      return nll / count + 0.1 * z / count, (nll, count, z)

    return jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(hidden, weight)

  (_, plain), plain_grads = losses(lambda h, w: cross_entropy_reference(h, w, targets, weights))
  chunked_fn = lambda h, w: chunked_cross_entropy(h, w, targets, weights, chunk_tokens=6)
  (_, chunked), chunked_grads = losses(chunked_fn)
  for a, b in zip(chunked, plain):  # nll, count and the z-loss sum separately
    np.testing.assert_allclose(a, b, rtol=1e-5)
  for a, b in zip(chunked_grads, plain_grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(plain_grads[1]).max()) > 1e-3  # the comparison is not between zeros
  # A chunk holding the whole batch is the plain loss itself.
  whole = lm_cross_entropy(hidden, head(weight), targets, weights, chunk_tokens=B * T)
  np.testing.assert_array_equal(whole[0], plain[0])


def test_model_loss_and_eval_match_with_and_without_chunks():
  """The train loss (with the z-loss), its gradients and the eval loss, tied head (the op test has both)."""
  config = tiny_config("gqa", tie_embeddings=True, num_layers=1)
  config.trainer.z_loss_alpha = 1e-2
  cfg = ModelConfig.from_config(config, vocab_size=64)
  model = LanguageModel(cfg)
  params, _ = init_params(cfg, jax.random.PRNGKey(0))
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (4, 32), 0, 64), np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}  # T = 31: the last chunk is padded
  results = []
  for chunk in (0, 16):
    config.trainer.loss_chunk_size = chunk
    grad_fn = jax.jit(jax.value_and_grad(make_loss_fn(config, model), has_aux=True))
    (loss, metrics), grads = grad_fn(params, {}, batch)
    results.append((loss, metrics, grads))
  (loss0, metrics0, grads0), (loss1, metrics1, grads1) = results
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  for key in metrics0:
    np.testing.assert_allclose(metrics1[key], metrics0[key], rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree_util.tree_leaves(grads1), jax.tree_util.tree_leaves(grads0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  nll, count = make_eval_step(model, loss_chunk_size=16)(params, {}, batch)  # evaluation reports the same
  assert int(count) == 4 * 31
  np.testing.assert_allclose(nll / count, metrics0["ce"], rtol=1e-5)
