"""grouped_matmul equals jax.lax.ragged_dot, values and gradients, for uneven, empty and partial groups."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.model.grouped import grouped_matmul

SIZES = {"uneven": [5, 0, 17, 3], "one_group": [0, 0, 40, 0], "ones": [1, 1, 1, 1],
         "rows_past_the_groups": [10, 9, 0, 2]}


@pytest.mark.parametrize("block", [None, 4])
def test_equals_ragged_dot_with_gradients(block):
    M, K, N = 40, 6, 5
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(block or 0), 3)
    x, w, cot = jax.random.normal(kx, (M, K)), jax.random.normal(kw, (4, K, N)), jax.random.normal(kc, (M, N))

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_grads(ours, x, w, gs):
        f = (lambda x, w: grouped_matmul(x, w, gs, block)) if ours else (lambda x, w: jax.lax.ragged_dot(x, w, gs))
        return f(x, w), jax.grad(lambda x, w: jnp.sum(f(x, w) * cot), argnums=(0, 1))(x, w)

    for name, sizes in SIZES.items():  # group sizes are traced: one compile serves every case
        gs = jnp.asarray(sizes, jnp.int32)
        (y, grads), (y_ref, grads_ref) = value_and_grads(True, x, w, gs), value_and_grads(False, x, w, gs)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=name)
        assert not np.asarray(y[sum(sizes):]).any(), name  # rows past the last group are zero, as in ragged_dot
        for a, b in zip(grads, grads_ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
