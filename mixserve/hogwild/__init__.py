"""Hogwild! inference: W workers of one model on one problem, sharing one KV cache.

Segments (`segments.py`) are runs of paged blocks with keys at segment-local positions; a worker's
view (`views.py`) is an ordered list of segments; attention over a view (`view_attention.py`)
rotates the query per segment and merges segments in one softmax. `session.py` runs the W-worker
step loop with the prompt format of `format.py`.
"""
