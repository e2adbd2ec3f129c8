"""Mechanisms: what is done with the scores (prefill dropping with revival, decode-time eviction with a
shadow set, merging), the state they keep with a KV cache, and the probe a layer fills for them."""
