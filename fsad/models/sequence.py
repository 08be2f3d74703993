"""AHL's importance model psi: a 2-layer bidirectional LSTM over score histories."""

from __future__ import annotations

import flax.linen as nn


class ScoreSequenceModel(nn.Module):
    """Predicts the next epoch's T scores of a sample from its previous K epochs.

    Call:
      seq: [N, K, T] -> [N, T].
    """

    num_tasks: int
    hidden: int = 7
    fc: int = 14
    layers: int = 2

    @nn.compact
    def __call__(self, seq):
        x = seq
        for i in range(self.layers):
            x = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(self.hidden), name=f"fwd{i}"),
                                 nn.RNN(nn.OptimizedLSTMCell(self.hidden), name=f"bwd{i}"),
                                 name=f"bilstm{i}")(x)
        x = nn.relu(nn.Dense(self.fc, name="fc")(x[:, -1]))
        return nn.Dense(self.num_tasks, name="out")(x)
