"""Control plane: requests, KV block accounting, scheduling, the step loop. Pure Python, no torch."""
