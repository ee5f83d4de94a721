"""Several servers through Redis: the call registry, the cluster-wide limit, the call event streams."""
