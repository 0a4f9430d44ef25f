"""Side-by-side benchmarks with real peers: Envoy, HAProxy, PyTriton and infinity-emb."""
