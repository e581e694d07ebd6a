"""Preference pairs built from embedded data (no download): ingest source `embedded:chatterbot_pairs`.

Contract: `chatterbot_pairs(conversations, seed=0) -> pyarrow.Table` with columns `prompt` (JSON
text of the messages before the last assistant turn), `chosen` (that turn: the conversation's own
reply), `rejected` (the last reply of a conversation from another category, drawn with a seeded
generator, never equal to `chosen`), `category`, `conversation_id`, `opening` (the group key of
`embedded:chatterbot`). `conversations`: the table `ingest._read_chatterbot` returns.

What it measures: whether a model ranks the reply that answers this conversation above a fluent
reply to another topic. The base already prefers it on some rows (a short generic reply can
still be likelier); DPO should raise that share on held-out conversations (split by `opening`).
"""

from __future__ import annotations

import json

SOURCE = "embedded:chatterbot_pairs"


def chatterbot_pairs(conversations, seed: int = 0):
    import numpy as np
    import pyarrow as pa

    rows = conversations.to_pylist()
    replies = [json.loads(r["messages"])[-1]["content"] for r in rows]
    rng = np.random.default_rng(seed)
    out = []
    for i, r in enumerate(rows):
        messages = json.loads(r["messages"])
        others = [j for j in range(len(rows)) if rows[j]["category"] != r["category"]
                  and replies[j].strip() != replies[i].strip()]
        j = others[int(rng.integers(len(others)))]
        out.append({"prompt": json.dumps(messages[:-1], ensure_ascii=False), "chosen": replies[i],
                    "rejected": replies[j], "category": r["category"], "conversation_id": r["conversation_id"],
                    "opening": r["opening"]})
    return pa.Table.from_pylist(out)
