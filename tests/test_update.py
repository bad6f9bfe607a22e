"""train/update.py: one lax.scan of epochs x minibatches over a dict of roles, against hand-written optax loops."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_rlhf.train import update as update_lib
from jax_rlhf.train.state import TrainState

B, D, EPOCHS, MINIBATCHES = 8, 3, 2, 2
STEPS = EPOCHS * MINIBATCHES
OPTIMIZERS = {'actor': optax.adam(0.05), 'critic': optax.sgd(0.1, momentum=0.9)}


def make_data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, D)).astype(np.float32)
  return {'x': x, 'y': (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.1).astype(np.float32)}


def make_states(seed=1):
  rng = np.random.default_rng(seed)
  params = {'actor': {'w': rng.normal(size=(D,)).astype(np.float32)},
            'critic': {'w': rng.normal(size=(D,)).astype(np.float32), 'b': np.zeros((), np.float32)}}
  rest = {'actor': {'scale': np.float32(2.0)}, 'critic': {}}
  return {name: TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.asarray, params[name]),
                           rest=jax.tree.map(jnp.asarray, rest[name]), opt_state=OPTIMIZERS[name].init(params[name]))
          for name in OPTIMIZERS}


def loss_fn(params, rest, minibatch, extra):
  """Both roles in one loss: the actor's squared error (times its non-trained scale) + the critic's."""
  actor = minibatch['x'] @ params['actor']['w'] * rest['actor']['scale']
  critic = jnp.tanh(minibatch['x'] @ params['critic']['w']) + params['critic']['b']
  actor_loss = jnp.mean((actor - minibatch['y']) ** 2)
  critic_loss = jnp.mean((critic - minibatch['y']) ** 2)
  loss = actor_loss + extra['weight'] * critic_loss
  return loss, {'loss': loss, 'actor_loss': actor_loss, 'flag': extra['flag']}


def hand_written(states, data, rng, extra, skipped=()):
  """The same steps as plain Python: a permutation per epoch, M contiguous slices, grad, each role's optax."""
  params = {name: jax.tree.map(np.asarray, st.params) for name, st in states.items()}
  opt = {name: st.opt_state for name, st in states.items()}
  rest = {name: st.rest for name, st in states.items()}
  keys = jax.random.split(rng, EPOCHS)
  size = B // MINIBATCHES
  losses, norms = [], {name: [] for name in states}
  for epoch in range(EPOCHS):
    perm = np.asarray(jax.random.permutation(keys[epoch], B))
    for m in range(MINIBATCHES):
      s = epoch * MINIBATCHES + m
      rows = perm[m * size:(m + 1) * size]
      minibatch = {k: v[rows] for k, v in data.items()}
      extra_s = {k: v[s] for k, v in extra.items()}
      (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, minibatch, extra_s)
      losses.append(float(loss))
      for name in states:
        norms[name].append(float(optax.tree.norm(grads[name])))
      if s in skipped:
        continue
      for name in states:
        updates, opt[name] = OPTIMIZERS[name].update(grads[name], opt[name], params[name])
        params[name] = optax.apply_updates(params[name], updates)
  return params, losses, norms


def run_update(states, data, rng, extra, skip=None):
  fn = jax.jit(lambda st, d, k, e: update_lib.update(loss_fn, OPTIMIZERS, st, d, k, epochs=EPOCHS,
                                                      num_minibatches=MINIBATCHES, extra=e, skip=skip))
  return fn(states, data, rng, extra)


def test_two_roles_with_their_own_optimizers_equal_two_handwritten_optax_loops():
  data, states, rng = make_data(), make_states(), jax.random.key(7)
  extra = {'weight': np.array([1.0, 0.5, 2.0, 0.0], np.float32), 'flag': np.zeros(STEPS, np.float32)}
  trained, metrics, per_step = run_update(states, data, rng, extra)
  params, losses, norms = hand_written(make_states(), data, rng, extra)
  for name in OPTIMIZERS:
    for got, want in zip(jax.tree.leaves(trained[name].params), jax.tree.leaves(params[name])):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert int(trained[name].step) == STEPS
    np.testing.assert_allclose(float(metrics[f'{name}_grad_norm']), np.mean(norms[name]), rtol=1e-5)
  np.testing.assert_allclose(per_step['loss'], losses, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss']), np.mean(losses), rtol=1e-5)
  assert 'skipped' not in metrics and int(metrics['nonfinite_skipped']) == 0  # plain optax: no finite guard
  moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(trained['critic'].params),
                                                          jax.tree.leaves(make_states()['critic'].params))]
  assert max(moved) > 1e-3


def test_skip_predicate_drops_whole_steps_and_leaves_state_unchanged():
  data, rng = make_data(), jax.random.key(3)
  # skip every step: every role keeps its state bitwise (params, optimizer moments, step counter)
  extra = {'weight': np.ones(STEPS, np.float32), 'flag': np.ones(STEPS, np.float32)}
  states = make_states()
  before = jax.tree.map(np.asarray, states)
  trained, metrics, _ = run_update(states, data, rng, extra, skip=lambda m: m['flag'] > 0)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, trained), before)
  assert float(metrics['skipped']) == STEPS
  # skip steps 1 and 2 only: the same as a hand-written loop that leaves those two out
  extra['flag'] = np.array([0, 1, 1, 0], np.float32)
  trained, metrics, per_step = run_update(make_states(), data, rng, extra, skip=lambda m: m['flag'] > 0)
  params, _, _ = hand_written(make_states(), data, rng, extra, skipped=(1, 2))
  assert float(metrics['skipped']) == 2
  np.testing.assert_array_equal(per_step['skipped'], [0, 1, 1, 0])
  for name in OPTIMIZERS:
    for got, want in zip(jax.tree.leaves(trained[name].params), jax.tree.leaves(params[name])):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert int(trained[name].step) == STEPS - 2


def test_nonfinite_gradients_are_skipped_and_counted_per_role():
  """With apply_if_finite optimizers (as `state.make_optimizer` builds), a NaN loss term that reaches only the
  critic skips the critic's update of that step, and `nonfinite_skipped` counts it."""
  guarded = {name: optax.apply_if_finite(tx, 1000) for name, tx in OPTIMIZERS.items()}
  data, rng = make_data(), jax.random.key(5)
  extra = {'weight': np.array([1.0, np.nan, 1.0, 1.0], np.float32), 'flag': np.zeros(STEPS, np.float32)}
  states = {name: st.replace(opt_state=guarded[name].init(st.params)) for name, st in make_states().items()}
  trained, metrics, _ = jax.jit(lambda st, d, k, e: update_lib.update(
      loss_fn, guarded, st, d, k, epochs=EPOCHS, num_minibatches=MINIBATCHES, extra=e))(states, data, rng, extra)
  assert int(metrics['nonfinite_skipped']) == 1
  assert int(trained['critic'].opt_state.total_notfinite) == 1 and int(trained['actor'].opt_state.total_notfinite) == 0
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(trained))
