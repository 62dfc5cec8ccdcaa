"""Exit 0 if a run's metrics.jsonl has COUNT records and its last loss is below its first (by 0.02).

    python benchmarks/loss_falls.py OUTPUT_DIR/metrics.jsonl 6
"""

import json
import sys

records = [json.loads(line) for line in open(sys.argv[1])]
losses = [r["loss"] for r in records]
print("losses:", [round(loss, 4) for loss in losses], "images/s at the end:", records[-1]["images_per_s"])
sys.exit(0 if len(losses) == int(sys.argv[2]) and losses[-1] < losses[0] - 0.02 else 1)
