"""`pagedllm bench`: benchmarks that print a table and write JSON, with peers run beside pagedllm.

    throughput.py         offline throughput of pagedllm and its peers (`bench throughput`)
    throughput_runner.py  one engine in a subprocess, for throughput.py
    latency.py            end-to-end latency of one batch through `LLM` (`bench latency`)
    serving.py            online serving against OpenAI-compatible servers (`bench serve`)
    serving_client.py     its load generator: arrivals and streaming requests
    serving_summary.py    its statistics, table, sustained rates and chart
    memory.py             the paper's memory measurements (`python -m pagedllm.benchmarks.memory`)
    attention.py          attention kernels (`python -m pagedllm.benchmarks.attention`)
    linear.py             linear layers' CPU paths (`python -m pagedllm.benchmarks.linear`)
    workloads.py          seeded request workloads shared by the benchmarks
    package_path.py       this package on another Python's path (vLLM's virtualenv)
    cli.py                the `bench` sub-command: add_bench_parser, run_bench

NOTE: this module imports nothing: throughput_runner.py runs under vLLM's virtualenv, which has
neither pagedllm's dependencies nor pagedllm itself, and importing it imports this first.
"""
