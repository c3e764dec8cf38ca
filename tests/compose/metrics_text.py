"""Reading an inference replica's Prometheus metrics: the one count the Docker tiers look at.

Standalone (prometheus_client only), so that tests/compose/swarm_client.py can use it inside
a container that has the image's packages and nothing of tests/.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def predicts_answered(metrics_text: str, model: str) -> float:
    """The replica's count of answered Predict requests for `model` (tandem_infer_requests_total)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "tandem_infer_requests_total"
        and sample.labels.get("model") == model
        and sample.labels.get("method") == "Predict"
    )
