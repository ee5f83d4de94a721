"""Examples of callsock applications; each is exercised by tests/test_examples.py."""
