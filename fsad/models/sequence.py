"""AHL's importance model psi: a 2-layer bidirectional LSTM over score histories, as the
paper describes it (the defaults) or as the released code builds it (`released_psi`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsad.models.heads import torch_bias_init, torch_kernel_init


class TorchLSTMCell(nn.RNNCellBase):
    """PyTorch's nn.LSTM cell: its parameters (the gates i, f, g, o stacked, and two
    biases, b_ih and b_hh, which Adam moves apart: Flax's cells have one) and its default
    init, every one U(+-1/sqrt(features)). weight_ih [in, 4 features] and
    weight_hh [features, 4 features] are PyTorch's transposed.

    Call: carry (c, h), each [N, features]; inputs [N, in] -> ((c', h'), h')."""

    features: int

    @nn.compact
    def __call__(self, carry, inputs):
        c, h = carry
        init = torch_bias_init(self.features)  # U(+-1/sqrt(features)) whatever the shape
        gates = 4 * self.features
        z = (inputs @ self.param("weight_ih", init, (inputs.shape[-1], gates))
             + self.param("bias_ih", init, (gates,))
             + h @ self.param("weight_hh", init, (self.features, gates))
             + self.param("bias_hh", init, (gates,)))
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
        h = nn.sigmoid(o) * jnp.tanh(c)
        return (c, h), h

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        zeros = jnp.zeros(tuple(input_shape[:-1]) + (self.features,))
        return zeros, zeros

    @property
    def num_feature_axes(self) -> int:
        return 1


class ScoreSequenceModel(nn.Module):
    """Predicts the next epoch's T scores of a sample from its previous K epochs.

    The paper's psi (the defaults): BiLSTM(hidden 7) x 2, then Dense(fc = 14), ReLU,
    Dense(T) on the last step. The released code's (modeling/aux_net.py; `released_psi`):
    hidden 6, dropout 0.5 between the LSTM layers, no hidden Dense (fc = 0: ReLU, then
    Dense(T)), PyTorch's nn.LSTM and nn.Linear (torch_modules: their parameters and
    default init) and a random initial state (the caller's `initial_state`).

    Call:
      seq: [N, K, T] -> [N, T].
      initial_state: (h0, c0), each [layers * 2, N, hidden] in nn.LSTM's layout (layer
        l's forward direction at 2 l, its backward one at 2 l + 1); zeros when None.
      dropout_rng: a key: dropout between the layers is on (PyTorch's train mode, which
        the released psi never leaves); None: off.
    """

    num_tasks: int
    hidden: int = 7
    fc: int = 14  # 0: no hidden Dense layer
    layers: int = 2
    dropout: float = 0.0
    torch_modules: bool = False

    @nn.compact
    def __call__(self, seq, initial_state=None, dropout_rng=None):
        x = seq
        for i in range(self.layers):
            if i and self.dropout and dropout_rng is not None:
                x = nn.Dropout(self.dropout, deterministic=False)(
                    x, rng=jax.random.fold_in(dropout_rng, i))
            # the carries in the dtype the cells compute in (float32 weights, the input's
            # dtype where wider: float64 for numerical checks, where flax's own float32
            # zeros broke its scan); zeros, as flax's, where not given
            dtype = jnp.promote_types(x.dtype, jnp.float32)
            if initial_state is None:
                zeros = jnp.zeros((x.shape[0], self.hidden), dtype)
                carries = ((zeros, zeros), (zeros, zeros))
            else:
                h0, c0 = initial_state
                carries = tuple((c0[2 * i + d].astype(dtype), h0[2 * i + d].astype(dtype))
                                for d in (0, 1))  # (c, h)
            cell = TorchLSTMCell if self.torch_modules else nn.OptimizedLSTMCell
            x = nn.Bidirectional(nn.RNN(cell(self.hidden), name=f"fwd{i}"),
                                 nn.RNN(cell(self.hidden), name=f"bwd{i}"),
                                 name=f"bilstm{i}")(x, initial_carry=carries)
        x = x[:, -1]
        if self.fc:
            x = nn.relu(self.dense(self.fc, 2 * self.hidden, "fc")(x))
        else:
            x = nn.relu(x)
        return self.dense(self.num_tasks, self.fc or 2 * self.hidden, "out")(x)

    def dense(self, features: int, fan_in: int, name: str) -> nn.Dense:
        """nn.Dense, initialised as nn.Linear(fan_in, features) where torch_modules."""
        if not self.torch_modules:
            return nn.Dense(features, name=name)
        return nn.Dense(features, kernel_init=torch_kernel_init,
                        bias_init=torch_bias_init(fan_in), name=name)


def released_initial_state(key, layers: int, n: int, hidden: int):
    """(h0, c0), each [layers * 2, n, hidden] drawn from U[0, 1): the released psi's
    `torch.rand` initial state, new on every call (here from an explicit key). Drawn
    sequence by sequence ([n, layers * 2, hidden], then transposed): the first n rows
    are the same draws whatever rows follow them (AHL's padded pool, `fsad.buckets`)."""
    kh, kc = jax.random.split(key)
    shape = (n, layers * 2, hidden)
    return tuple(jax.random.uniform(k, shape).transpose(1, 0, 2) for k in (kh, kc))

