"""Test data: sample /metrics pages and the generator that writes them."""
