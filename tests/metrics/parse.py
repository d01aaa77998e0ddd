"""Parses an OpenMetrics exposition (stdin) with the reference Python parser, the one
Prometheus' own client library ships, and prints every sample as JSON lines:
{"name": ..., "labels": {...}, "value": ...}. A malformed exposition fails loudly."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        print(json.dumps({"name": sample.name, "labels": sample.labels, "value": sample.value}))
