"""The benchmark suite behind `fastseq2seq bench` (and bench/run_all.py, bench/bench_<name>.py): each benchmark
times fastseq2seq side by side with its baselines (timing.py), relates the times to each op's cost model
(costs.py) and to ceilings measured in the same run (ceilings.py), and writes markdown, JSON and charts (report.py).
One module per benchmark; suite.py runs them."""
