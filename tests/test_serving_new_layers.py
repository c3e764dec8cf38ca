"""A model with every new layer type, trained a few steps, through a real checkpoint into a real
inference service: it serves what the core computes in evaluation mode."""

import numpy as np

from shared.checkpoints.checkpoint import CheckpointMeta
from shared.data import load_dataset
from shared.nn import build_model, fit, make_optimizer
from tests.inference_harness import NAME, NUM_CLASSES, assert_close, probabilities, samples

SPEC = {
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "filters": 6, "padding": "same"},
        {"type": "batchnorm"},
        {"type": "leaky_relu"},
        {"type": "dropout", "rate": 0.2},
        {"type": "conv2d", "filters": 8},
        {"type": "global_avgpool"},
        {"type": "batchnorm", "momentum": 0.3},
        {"type": "gelu"},
        {"type": "dense", "units": 16},
        {"type": "gelu", "approximate": "tanh"},
        {"type": "dropout", "rate": 0.5},
        {"type": "dense", "units": NUM_CLASSES},
    ],
}


def test_served_probabilities_are_the_cores_in_evaluation_mode(checkpoints, start_inference):
    digits = load_dataset("digits")
    model = build_model(SPEC).initialise(0)
    x_train, y_train = digits.x_train[:320].astype(np.float32), digits.y_train[:320]
    fit(model, make_optimizer("adam", 1e-2), x_train, y_train, epochs=1, batch_size=32, seed=0)
    assert not np.allclose(model.buffers()["layers.6.running_var"], 1.0)  # trained: not the initial ones

    version = checkpoints.publish(model, CheckpointMeta(NAME, model.spec, "float32", dataset="digits"))
    inference = start_inference()
    x = np.concatenate([digits.x_test[:9].astype(np.float32), samples(3)])

    response = inference.predict(x)

    assert response.version == version
    expected = model.predict_proba(x)
    assert_close(probabilities(response), expected)
    assert_close(probabilities(inference.predict(x[:1])), expected[:1])  # no batch statistics
