"""What a decode query's exact top-100 is made of on `ra bench --decode-step`'s synthetic layer:
how much of it lies in the topic the query seeks (the keys drawn around that topic's centre, in
stretches of 128 positions) and how much is scattered over other topics, where only the noise of
the draw put a key above the cut. An index that finds the sought topic whole still has to find the
scattered rest for recall 0.90; nothing about those keys tells a search where they are.

    python benchmarks/decode_step_answers.py [KEYS]

Prints one JSON object: per query head and decode query (64 queries, as the bench draws them),
the share of the top-100 in its most common topic, the stretches of 128 positions it spans, and
the share of searches whose top-100 holds fewer than 90 keys of one topic (recall 0.90 needs keys
from elsewhere there)."""

import json
import sys

import numpy as np

from ra_cli.bench.decode import DecodeStepConfig, synthetic_layer
from ra_cli.index.base import IndexParams

n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
config = DecodeStepConfig(keys=n)
params = IndexParams()
sinks, window, top_k, stretch = params.sinks, params.window, config.top_k, 128
keys, _, queries_for, heads, topic_of = synthetic_layer(config, sinks + n + window)
indexed = keys[:, sinks:sinks + n]  # the keys the index holds, as the bench indexes them
decode = queries_for(np.full(config.queries, sinks + n + window - 1))
group = heads // keys.shape[0]
one_topic, stretches = [], []
for head in range(heads):
    scores = decode[head] @ indexed[head // group].T
    for top in np.argpartition(-scores, top_k, axis=1)[:, :top_k]:
        positions = sinks + top
        one_topic.append(np.unique(topic_of[positions], return_counts=True)[1].max() / top_k)
        stretches.append(len(np.unique(positions // stretch)))
one_topic, stretches = np.array(one_topic), np.array(stretches)
print(json.dumps({
    "indexed_keys": n, "searches": len(one_topic), "top_k": top_k,
    "share_in_one_topic_mean": round(float(one_topic.mean()), 3),
    "share_in_one_topic_p10": round(float(np.percentile(one_topic, 10)), 3),
    "stretches_spanned_mean": round(float(stretches.mean()), 1),
    "stretches_spanned_median": float(np.median(stretches)),
    "searches_under_90_in_one_topic": round(float((one_topic < 0.9).mean()), 3),
}))
