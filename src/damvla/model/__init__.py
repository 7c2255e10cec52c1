"""The DAM-VLA model: vision, language model, router, DiT action heads, and the policy tying them."""
