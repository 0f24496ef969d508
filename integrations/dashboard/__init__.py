"""kvkit's live dashboard: a small web server and a page over the kvkit_* metrics.

`sources` reads the metrics (a kvkit /metrics endpoint, or a Prometheus server's query API) and
derives what the page shows: memory saved vs dense, sparsity per decode step, eviction rate,
selection recall, expert-cache hit rate. `server` polls a source, keeps a short history and
serves `static/` (the page, with the vendored uPlot chart library, so it works offline).
Entry point: `kvkit.integrations.dashboard.server.main(argv)`, behind `kvkit dashboard`.
"""
