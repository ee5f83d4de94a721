"""The client-side tools: simulate a call, benchmark a server, verify a deployment."""
