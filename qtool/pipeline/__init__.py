"""Plans what happens to each tensor, runs the streams between a source and a sink on worker
threads, publishes atomically, and yields per-tensor results as data."""
