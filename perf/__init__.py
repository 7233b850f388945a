"""perf: load tests, backend benchmarks and their reports.

`bench_text_search`: the `text_search` ensemble served by the real tritonserver, loaded by Triton's own
perf_analyzer over gRPC, side by side with the same pipeline called in-process (CSV, PNG, environment).
"""
