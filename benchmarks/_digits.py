"""sklearn's digits (the embedded real dataset): 8x8 images, or upsampled to 28x28 (784)."""

import jax
import jax.numpy as jnp
import numpy as np


def digits(size: int = 8, test: int = 397, seed: int = 0):
    """(x_train, y_train, x_test, y_test) with pixels in [0, 1] and one-hot labels."""
    from sklearn.datasets import load_digits

    X, labels = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    if size != 8:
        imgs = jnp.asarray(X.reshape(-1, 8, 8))
        X = np.asarray(jax.image.resize(imgs, (len(X), size, size), "linear")).reshape(len(X), -1)
    order = np.random.default_rng(seed).permutation(len(X))
    X, labels = X[order], labels[order]
    Y = np.eye(10, dtype=np.float32)[labels]
    n = len(X) - test
    return jnp.asarray(X[:n]), jnp.asarray(Y[:n]), jnp.asarray(X[n:]), jnp.asarray(Y[n:])
