"""Helpers shared by several test modules (test data builders, fault proxies, fuzz seeds).

Test modules import from here, never from each other."""
