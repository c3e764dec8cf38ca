"""Softmax, the softmax + cross-entropy loss (fused and numerically stable), and top-k ranking."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax by log-sum-exp, with each row's maximum subtracted first."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most probable classes and their probabilities, each [N, k], most probable first.

    Ties go to the lower class index (a stable sort), so a ranking is the same everywhere.
    """
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probabilities, order, axis=1)


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels.

    The loss is computed from log-softmax (never log(p + eps)), and its
    gradient with respect to the logits is (softmax - one_hot) / N.
    """

    def __init__(self):
        self._log_probs: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    def forward(self, logits: np.ndarray, labels: np.ndarray) -> float:
        self._log_probs = log_softmax(logits)
        self._labels = labels
        picked = self._log_probs[np.arange(len(labels)), labels]
        return float(-picked.mean())

    def backward(self) -> np.ndarray:
        log_probs, labels = self._log_probs, self._labels
        if log_probs is None or labels is None:
            raise RuntimeError("softmax cross-entropy: backward needs a forward first")
        n = len(labels)
        dlogits = np.exp(log_probs)
        dlogits[np.arange(n), labels] -= 1
        return dlogits / np.asarray(n, dtype=dlogits.dtype)
