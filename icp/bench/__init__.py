"""The benchmarks behind eval/bench_train.py (GPU training / sampling / loader, issue 9: train.py and
its rows) and eval/bench_data.py (render and loader rates: data.py)."""
