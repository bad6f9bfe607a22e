"""Scalar heads for reward and value models, on the decoder's final hidden states.

A `ScalarModel` is a `Transformer` body without the LM head plus a linear head to one number per token.
Reward model: the reward of a response is the head's output at its last real token (its EOS), never at a
pad (N+ #12). Value model: one value per token. Both are initialised from an LM checkpoint's body; the head
is N(0, 1/sqrt(d+1)) with bias 0 (Ziegler et al. 2019; N+ #11).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from jax_rlhf.models import scoring
from jax_rlhf.models.transformer import Transformer
from jax_rlhf.models.transformer_config import TransformerConfig


class ScalarHead(nnx.Module):

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    d = cfg.embed_dim
    std = 1.0 / math.sqrt(d + 1)
    self.kernel = nnx.Param((std * nnx.initializers.normal(1.0)(rngs.params(), (d,), jnp.float32)),
                            out_sharding=('embed',), eager_sharding=False)
    self.bias = nnx.Param(jnp.zeros((), jnp.float32), out_sharding=(), eager_sharding=False)
    # Affine normalisation applied after training (InstructGPT: demonstrations score mean 0); not trained.
    self.norm_gain = nnx.Variable(jnp.ones((), jnp.float32))
    self.norm_bias = nnx.Variable(jnp.zeros((), jnp.float32))

  def __call__(self, h):
    """h: [B, T, D] -> [B, T] float32."""
    y = jnp.einsum('btd,d->bt', h.astype(jnp.float32), self.kernel[...]) + self.bias[...]
    return y * self.norm_gain[...] + self.norm_bias[...]


class ScalarModel(nnx.Module):
  """Decoder body + scalar head: per-token scalars [B, T] (values), or the score at the last real token."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.transformer = Transformer(cfg, rngs=rngs, lm_head=False)
    self.head = ScalarHead(cfg, rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, positions=None, dropout_key=None):
    h, _ = self.transformer.hidden_states(input_ids, attention_mask, positions, dropout_key=dropout_key)
    return self.head(h)

  def score(self, input_ids, attention_mask, dropout_key=None):
    """The scalar at each row's last real token: [B]. Works for left- and right-padded rows."""
    values = self(input_ids, attention_mask, dropout_key=dropout_key)  # [B, T]
    return scoring.at_last_real(values, attention_mask)
