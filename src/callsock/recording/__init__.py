"""Recording: the bounded audio buffer, the sinks that write a call's formats, publication, recovery."""
